/*
 * C test of the agent API against a real relay and connector on loopback.
 * Built with -Wall -Wextra -Werror -fsanitize=address by tests/c_api.rs.
 *
 * usage: agent_test RELAY_ADDR CA_FILE LOAD_SECONDS RSS_LIMIT_KB
 *
 * Connects, waits for the observed address and the registration of
 * "echo" (100.100.0.10/32), pings the service, sends UDP packets to its
 * port 7 and checks every echo, checks that unmapped and malformed
 * packets are refused and counted, then runs sustained load while
 * watching resident memory. Prints "RESULT key=value ..." on success.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ztna_agent.h"

#define BATCH 32
#define BUF 2048

static uint8_t rx_bufs[BATCH][BUF];
static uint8_t tx_bufs[BATCH][BUF];
static uint8_t ip_bufs[BATCH][BUF];

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void die(const char *what, int32_t rc) {
    fprintf(stderr, "FAIL %s: %d (%s)\n", what, rc, ztna_strerror(rc));
    exit(1);
}

static long rss_kb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &size, &res) != 2) res = -1;
    fclose(f);
    return res * (sysconf(_SC_PAGESIZE) / 1024);
}

static uint16_t csum(const uint8_t *p, size_t n, uint32_t sum) {
    for (size_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) sum += (uint32_t)(p[n - 1] << 8);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* IPv4 header (20 bytes) with checksum. */
static void ip_header(uint8_t *b, uint16_t total, uint8_t proto, const uint8_t src[4], const uint8_t dst[4]) {
    memset(b, 0, 20);
    b[0] = 0x45;
    b[2] = (uint8_t)(total >> 8);
    b[3] = (uint8_t)total;
    b[6] = 0x40; /* DF */
    b[8] = 64;
    b[9] = proto;
    memcpy(b + 12, src, 4);
    memcpy(b + 16, dst, 4);
    uint16_t c = csum(b, 20, 0);
    b[10] = (uint8_t)(c >> 8);
    b[11] = (uint8_t)c;
}

static size_t udp_packet(uint8_t *b, const uint8_t src[4], uint16_t sport, const uint8_t dst[4], uint16_t dport,
                         const uint8_t *payload, size_t len) {
    uint16_t ulen = (uint16_t)(8 + len);
    ip_header(b, (uint16_t)(20 + ulen), 17, src, dst);
    uint8_t *u = b + 20;
    u[0] = (uint8_t)(sport >> 8);
    u[1] = (uint8_t)sport;
    u[2] = (uint8_t)(dport >> 8);
    u[3] = (uint8_t)dport;
    u[4] = (uint8_t)(ulen >> 8);
    u[5] = (uint8_t)ulen;
    u[6] = u[7] = 0;
    memcpy(u + 8, payload, len);
    uint32_t pseudo = 0;
    for (int i = 0; i < 4; i += 2) {
        pseudo += (uint32_t)(src[i] << 8 | src[i + 1]);
        pseudo += (uint32_t)(dst[i] << 8 | dst[i + 1]);
    }
    pseudo += 17 + ulen;
    uint16_t c = csum(u, ulen, pseudo);
    if (c == 0) c = 0xffff;
    u[6] = (uint8_t)(c >> 8);
    u[7] = (uint8_t)c;
    return 20 + ulen;
}

static size_t icmp_echo(uint8_t *b, const uint8_t src[4], const uint8_t dst[4], uint16_t id, uint16_t seq) {
    size_t len = 8 + 32;
    ip_header(b, (uint16_t)(20 + len), 1, src, dst);
    uint8_t *m = b + 20;
    memset(m, 0, len);
    m[0] = 8;
    m[4] = (uint8_t)(id >> 8);
    m[5] = (uint8_t)id;
    m[6] = (uint8_t)(seq >> 8);
    m[7] = (uint8_t)seq;
    for (size_t i = 8; i < len; i++) m[i] = (uint8_t)i;
    uint16_t c = csum(m, len, 0);
    m[2] = (uint8_t)(c >> 8);
    m[3] = (uint8_t)c;
    return 20 + len;
}

struct ctx {
    ZtnaAgent *agent;
    int fd;
    struct sockaddr_in relay;
    uint64_t ffi_calls;
    int registered;
    int session_up;
    char connector[256];
    int observed;
    ZtnaAddr observed_addr;
    int disconnected;
    char reason[256];
    int path_events;
};

/* One event-loop turn: socket → agent, timers, agent → socket, events. */
static void pump(struct ctx *c, int wait_ms) {
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    uint64_t deadline = 0;
    c->ffi_calls++;
    if (ztna_agent_next_timeout(c->agent, &deadline) == 1) {
        uint64_t t = now_us();
        int ms = deadline > t ? (int)((deadline - t) / 1000) : 0;
        if (ms < wait_ms) wait_ms = ms;
    }
    poll(&p, 1, wait_ms);
    ZtnaDatagram in[BATCH];
    size_t n = 0;
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t r = recvfrom(c->fd, rx_bufs[n], BUF, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
        if (r < 0) break;
        in[n].data = rx_bufs[n];
        in[n].len = (size_t)r;
        in[n].cap = BUF;
        memset(&in[n].addr, 0, sizeof in[n].addr);
        in[n].addr.family = 4;
        memcpy(in[n].addr.ip, &from.sin_addr, 4);
        in[n].addr.port = ntohs(from.sin_port);
        if (++n == BATCH) {
            int32_t rc = ztna_agent_recv_udp(c->agent, in, n, now_us());
            c->ffi_calls++;
            if (rc < 0) die("recv_udp", rc);
            n = 0;
        }
    }
    if (n > 0) {
        int32_t rc = ztna_agent_recv_udp(c->agent, in, n, now_us());
        c->ffi_calls++;
        if (rc < 0) die("recv_udp", rc);
    }
    int32_t rc = ztna_agent_on_timeout(c->agent, now_us());
    c->ffi_calls++;
    if (rc < 0) die("on_timeout", rc);
    for (;;) {
        ZtnaDatagram out[BATCH];
        for (int i = 0; i < BATCH; i++) {
            out[i].data = tx_bufs[i];
            out[i].cap = BUF;
            out[i].len = 0;
        }
        int32_t k = ztna_agent_poll_udp(c->agent, out, BATCH, now_us());
        c->ffi_calls++;
        if (k < 0) die("poll_udp", k);
        for (int i = 0; i < k; i++) {
            struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(out[i].addr.port)};
            memcpy(&to.sin_addr, out[i].addr.ip, 4);
            sendto(c->fd, out[i].data, out[i].len, 0, (struct sockaddr *)&to, sizeof to);
        }
        if (k < BATCH) break;
    }
    ZtnaEvent ev;
    while (ztna_agent_poll_event(c->agent, &ev) == 1) {
        c->ffi_calls++;
        if (ev.kind == ZTNA_EVENT_REGISTERED) c->registered = 1;
        if (ev.kind == ZTNA_EVENT_SESSION_UP) {
            c->session_up = 1;
            memcpy(c->connector, ev.text, sizeof c->connector);
            c->connector[sizeof c->connector - 1] = 0;
        }
        if (ev.kind == ZTNA_EVENT_PATH_CHANGED && ev.addr.family != 0 && strcmp((const char *)ev.text, "direct") == 0)
            c->path_events++;
        if (ev.kind == ZTNA_EVENT_SESSION_CLOSED) fprintf(stderr, "session closed: %s\n", (const char *)ev.text);
        if (ev.kind == ZTNA_EVENT_OBSERVED_ADDRESS) {
            c->observed = 1;
            c->observed_addr = ev.addr;
        }
        if (ev.kind == ZTNA_EVENT_REGISTER_FAILED) fprintf(stderr, "register failed: code %u\n", ev.code);
        if (ev.kind == ZTNA_EVENT_DISCONNECTED) {
            c->disconnected = 1;
            memcpy(c->reason, ev.text, sizeof c->reason);
            c->reason[sizeof c->reason - 1] = 0;
        }
    }
}

/* Reads inbound IP packets; returns how many were UDP echoes of ours. */
static int drain_ip(struct ctx *c, uint64_t *echoes, uint64_t *pongs, uint64_t *bad) {
    ZtnaPacket pk[BATCH];
    int total = 0;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            pk[i].data = ip_bufs[i];
            pk[i].cap = BUF;
            pk[i].len = 0;
        }
        int32_t k = ztna_agent_poll_ip(c->agent, pk, BATCH);
        c->ffi_calls++;
        if (k < 0) die("poll_ip", k);
        for (int i = 0; i < k; i++) {
            const uint8_t *b = pk[i].data;
            if (pk[i].len >= 28 && b[9] == 17 && b[12] == 100 && b[15] == 10 && b[21] == 7 &&
                memcmp(b + 28, "ztna", 4) == 0)
                (*echoes)++;
            else if (pk[i].len >= 28 && b[9] == 1 && b[20] == 0)
                (*pongs)++;
            else
                (*bad)++;
        }
        total += k;
        if (k < BATCH) break;
    }
    return total;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s RELAY CA CERT KEY LOAD_SECONDS RSS_LIMIT_KB\n", argv[0]);
        return 2;
    }
    if (ztna_version() >> 16 != 3 || (ztna_version() & 0xffff) < 2) die("version", -1);
    struct ctx c;
    memset(&c, 0, sizeof c);
    c.fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in local = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &local.sin_addr);
    if (bind(c.fd, (struct sockaddr *)&local, sizeof local) != 0) die("bind", -errno);
    socklen_t ll = sizeof local;
    getsockname(c.fd, (struct sockaddr *)&local, &ll);
    char local_str[64];
    snprintf(local_str, sizeof local_str, "127.0.0.1:%u", ntohs(local.sin_port));

    ZtnaRoute routes[1] = {{.service = "echo", .cidr = "100.100.0.10/32"}};
    ZtnaConfig cfg = {
        .relay_addr = argv[1],
        .server_name = "localhost",
        .ca_file = argv[2],
        .cert_file = argv[3],
        .key_file = argv[4],
        .insecure_skip_verify = 0,
        .local_addr = local_str,
        .routes = routes,
        .routes_len = 1,
        .seed = (uint64_t)now_us(),
        .now_us = now_us(),
    };
    /* Bad input first: NULLs and bad values are refused, not crashes. */
    if (ztna_agent_new(NULL, &c.agent) != ZTNA_ERR_NULL) die("new(NULL)", -1);
    ZtnaConfig bad = cfg;
    bad.relay_addr = "not an address";
    if (ztna_agent_new(&bad, &c.agent) != ZTNA_ERR_CONFIG) die("new(bad relay)", -1);
    int32_t rc = ztna_agent_new(&cfg, &c.agent);
    if (rc != ZTNA_OK) die("new", rc);
    if (ztna_agent_send_ip(NULL, NULL, 0, NULL) != ZTNA_ERR_NULL) die("send_ip(NULL)", -1);
    /* 3.3: the device's interface addresses (host candidates). Loopback is
     * left out by the core; a bad family changes nothing. */
    ZtnaAddr host[2] = {{.family = 4, .ip = {127, 0, 0, 1}}, {.family = 6, .ip = {0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7}}};
    if (ztna_agent_set_host_addresses(c.agent, NULL, 1) != ZTNA_ERR_NULL) die("set_host_addresses(NULL)", -1);
    ZtnaAddr bad_family = {.family = 5};
    if (ztna_agent_set_host_addresses(c.agent, &bad_family, 1) != ZTNA_ERR_INVALID) die("set_host_addresses(bad)", -1);
    if (ztna_agent_set_host_addresses(c.agent, host, ZTNA_MAX_HOST_ADDRESSES + 1) != ZTNA_ERR_INVALID)
        die("set_host_addresses(too many)", -1);
    rc = ztna_agent_set_host_addresses(c.agent, host, 2);
    if (rc != ZTNA_OK) die("set_host_addresses", rc);

    uint64_t t0 = now_us();
    /* Registered, and the end-to-end session with the connector up: the
     * connector proved the identity the relay named. */
    while (!(c.registered && c.observed && c.session_up)) {
        pump(&c, 20);
        if (now_us() - t0 > 10000000u) die("connect/register/session timeout", -1);
    }
    if (strcmp(c.connector, "spiffe://dev.ztna/connector/echo-connector") != 0) die("connector identity", -1);
    if (c.observed_addr.port != ntohs(local.sin_port)) die("observed port", (int32_t)c.observed_addr.port);

    const uint8_t me[4] = {10, 7, 0, 2}, svc[4] = {100, 100, 0, 10}, nowhere[4] = {10, 0, 0, 1};
    uint8_t pkt[BUF];
    int32_t res;
    ZtnaPacket one = {.data = pkt, .cap = BUF};

    /* Unmapped destination: refused, counted, never sent. */
    one.len = udp_packet(pkt, me, 5555, nowhere, 7, (const uint8_t *)"lost", 4);
    if (ztna_agent_send_ip(c.agent, &one, 1, &res) != 0 || res != ZTNA_ERR_UNMAPPED) die("unmapped", res);
    /* Malformed: refused, counted. */
    one.len = 3;
    if (ztna_agent_send_ip(c.agent, &one, 1, &res) != 0 || res != ZTNA_ERR_MALFORMED) die("malformed", res);

    /* Ping and 100 UDP echoes. */
    uint64_t echoes = 0, pongs = 0, bad_in = 0;
    one.len = icmp_echo(pkt, me, svc, 77, 1);
    if (ztna_agent_send_ip(c.agent, &one, 1, &res) != 1) die("ping", res);
    for (int i = 0; i < 100; i++) {
        char msg[32];
        int m = snprintf(msg, sizeof msg, "ztna %d", i);
        one.len = udp_packet(pkt, me, 5555, svc, 7, (const uint8_t *)msg, (size_t)m);
        if (ztna_agent_send_ip(c.agent, &one, 1, &res) != 1) die("send udp", res);
        c.ffi_calls++;
    }
    t0 = now_us();
    while ((echoes < 100 || pongs < 1) && now_us() - t0 < 10000000u) {
        pump(&c, 5);
        drain_ip(&c, &echoes, &pongs, &bad_in);
    }
    if (echoes != 100 || pongs != 1) {
        fprintf(stderr, "FAIL echoes %llu pongs %llu bad %llu\n", (unsigned long long)echoes,
                (unsigned long long)pongs, (unsigned long long)bad_in);
        return 1;
    }

    /* Sustained load: batches of 32 packets, watch RSS. */
    long load_s = atol(argv[5]), limit_kb = atol(argv[6]), rss_max = 0;
    uint64_t sent = 0, echoed = 0, refused = 0, calls_before = c.ffi_calls;
    ZtnaPacket batch[BATCH];
    static uint8_t load_bufs[BATCH][256];
    int32_t results[BATCH];
    t0 = now_us();
    uint64_t start_echoes = echoes;
    while (now_us() - t0 < (uint64_t)load_s * 1000000u) {
        for (int i = 0; i < BATCH; i++) {
            batch[i].data = load_bufs[i];
            batch[i].cap = sizeof load_bufs[i];
            batch[i].len = udp_packet(load_bufs[i], me, 6000, svc, 7, (const uint8_t *)"ztna load payload.......", 24);
        }
        int32_t k = ztna_agent_send_ip(c.agent, batch, BATCH, results);
        c.ffi_calls++;
        if (k < 0) die("send batch", k);
        sent += (uint64_t)k;
        refused += (uint64_t)(BATCH - k);
        pump(&c, 0);
        drain_ip(&c, &echoes, &pongs, &bad_in);
        long r = rss_kb();
        if (r > rss_max) rss_max = r;
    }
    for (int i = 0; i < 200; i++) {
        pump(&c, 5);
        drain_ip(&c, &echoes, &pongs, &bad_in);
    }
    echoed = echoes - start_echoes;
    ZtnaStats st;
    if (ztna_agent_stats(c.agent, &st) != ZTNA_OK) die("stats", -1);
    if (st.drop_unmapped != 1 || st.drop_malformed != 1) die("drop counters", (int32_t)st.drop_unmapped);
    if (st.e2e_handshakes != 1 || st.e2e_established != 1 || st.e2e_sessions_up != 1) die("e2e counters", (int32_t)st.e2e_handshakes);
    ZtnaPathStats ps;
    if (ztna_agent_path_stats(c.agent, &ps) != ZTNA_OK) die("path_stats", -1);
    if (ps.time_to_direct_buckets[9] != ps.time_to_direct_count) die("time_to_direct +Inf bucket", -1);
    double calls_per_pkt = (double)(c.ffi_calls - calls_before) / (double)(sent + echoed);
    printf("RESULT observed_port=%u echoes=100 pongs=1 connector=%s load_sent=%llu load_echoed=%llu refused=%llu "
           "rss_max_kb=%ld ffi_calls_per_packet=%.3f direct_in=%llu direct_out=%llu sessions_direct=%llu "
           "path_to_direct=%llu path_events=%d ttd_count=%llu ttd_le_3s=%llu rounds=%llu rounds_direct=%llu "
           "direct_bytes_in=%llu\n",
           c.observed_addr.port, c.connector, (unsigned long long)sent, (unsigned long long)echoed,
           (unsigned long long)refused, rss_max, calls_per_pkt, (unsigned long long)st.direct_packets_in,
           (unsigned long long)st.direct_packets_out, (unsigned long long)st.e2e_sessions_direct,
           (unsigned long long)st.path_to_direct, c.path_events, (unsigned long long)ps.time_to_direct_count,
           (unsigned long long)ps.time_to_direct_buckets[6], (unsigned long long)ps.punch_rounds,
           (unsigned long long)ps.punch_rounds_direct, (unsigned long long)ps.direct_bytes_in);
    /* A relay name its certificate does not cover: refused, and the
     * reason says why, cut in the event, whole from last_failure. */
    char none[8] = {1};
    if (ztna_agent_last_failure(c.agent, none, sizeof none) != 0 || none[0] != 0) die("last_failure before any", -1);
    struct ctx w;
    memset(&w, 0, sizeof w);
    w.fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in wl = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &wl.sin_addr);
    if (bind(w.fd, (struct sockaddr *)&wl, sizeof wl) != 0) die("bind", -errno);
    ll = sizeof wl;
    getsockname(w.fd, (struct sockaddr *)&wl, &ll);
    char wl_str[64];
    snprintf(wl_str, sizeof wl_str, "127.0.0.1:%u", ntohs(wl.sin_port));
    ZtnaConfig wrong = cfg;
    wrong.server_name = "relay.example.com";
    wrong.local_addr = wl_str;
    if ((rc = ztna_agent_new(&wrong, &w.agent)) != ZTNA_OK) die("new(wrong name)", rc);
    t0 = now_us();
    while (!w.disconnected) {
        pump(&w, 20);
        if (now_us() - t0 > 10000000u) die("wrong name: no disconnect", -1);
    }
    if (!strstr(w.reason, "does not cover the server name")) die("disconnect event text", -1);
    size_t need = ztna_agent_last_failure(w.agent, NULL, 0);
    char *full = malloc(need + 1);
    if (!full || ztna_agent_last_failure(w.agent, full, need + 1) != need || strlen(full) != need) die("last_failure", -1);
    if (!strstr(full, "DNS SANs: localhost") || need < 256) die("last_failure text", (int32_t)need);
    printf("REFUSED %s\n", full);
    free(full);
    ztna_agent_free(w.agent);
    close(w.fd);

    ztna_agent_free(c.agent);
    close(c.fd);
    if (rss_max > limit_kb) {
        fprintf(stderr, "FAIL rss %ld kB above limit %ld kB\n", rss_max, limit_kb);
        return 1;
    }
    if (echoed == 0) die("no echoes under load", -1);
    return 0;
}
