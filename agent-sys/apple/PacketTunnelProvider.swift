// A minimal NEPacketTunnelProvider driving the ztna agent through its C API.
// Compile against ZtnaAgent.xcframework (see docs/apple.md). All calls on the
// agent handle happen on `queue`: the handle is not thread-safe.

import Foundation
import Network
import NetworkExtension
import ZtnaAgent

final class PacketTunnelProvider: NEPacketTunnelProvider {
    private let queue = DispatchQueue(label: "ztna.agent")
    private var agent: OpaquePointer?
    private var udp: NWConnection?
    private var timer: DispatchSourceTimer?
    private let relayHost = "relay.example.com"
    private let relayPort: UInt16 = 4433
    private let serviceCIDR = ("echo", "100.100.0.10/32")

    private func nowUs() -> UInt64 { DispatchTime.now().uptimeNanoseconds / 1000 }

    override func startTunnel(options: [String: NSObject]?, completionHandler: @escaping (Error?) -> Void) {
        let settings = NEPacketTunnelNetworkSettings(tunnelRemoteAddress: relayHost)
        let ipv4 = NEIPv4Settings(addresses: ["100.64.0.1"], subnetMasks: ["255.255.255.255"])
        ipv4.includedRoutes = [NEIPv4Route(destinationAddress: "100.100.0.10", subnetMask: "255.255.255.255")]
        settings.ipv4Settings = ipv4
        settings.mtu = 1280
        setTunnelNetworkSettings(settings) { [weak self] error in
            guard let self, error == nil else { return completionHandler(error) }
            self.queue.async { completionHandler(self.startAgent()) }
        }
    }

    private func startAgent() -> Error? {
        // The organisation CA: it signs the relay and the connectors (the end-to-end session
        // verifies the connector against it; required).
        let ca = Bundle.main.path(forResource: "ca", ofType: "pem")
        // The agent's identity (spiffe://<trust-domain>/agent/<name>). In a real app, keep the key in the
        // keychain and export it to the extension's container only as long as needed.
        let cert = Bundle.main.path(forResource: "agent", ofType: "pem") ?? ""
        let key = Bundle.main.path(forResource: "agent", ofType: "key") ?? ""
        // The relay address must be an IP:PORT; resolve relayHost beforehand in a real app.
        let rc: Int32 = "echo".withCString { svc in
            serviceCIDR.1.withCString { cidr in
                var route = ZtnaRoute(service: svc, cidr: cidr)
                return "203.0.113.10:4433".withCString { relay in
                    relayHost.withCString { name in
                        (ca ?? "").withCString { caPath in
                          cert.withCString { certPath in
                            key.withCString { keyPath in
                              "0.0.0.0:0".withCString { local in
                                withUnsafePointer(to: &route) { routes in
                                    var cfg = ZtnaConfig(
                                        relay_addr: relay, server_name: name,
                                        ca_file: ca == nil ? nil : caPath,
                                        cert_file: certPath, key_file: keyPath, insecure_skip_verify: 0,
                                        local_addr: local, routes: routes, routes_len: 1,
                                        // No pins: any connector the relay binds, whose
                                        // certificate must carry the identity the relay named.
                                        pins: nil, pins_len: 0,
                                        seed: UInt64.random(in: 0...UInt64.max), now_us: nowUs())
                                    return ztna_agent_new(&cfg, &agent)
                                }
                              }
                            }
                          }
                            }
                        }
                    }
                }
            }
        }
        guard rc == ZTNA_OK else {
            return NSError(domain: "ztna", code: Int(rc),
                           userInfo: [NSLocalizedDescriptionKey: String(cString: ztna_strerror(rc))])
        }
        let conn = NWConnection(host: "203.0.113.10", port: NWEndpoint.Port(rawValue: relayPort)!, using: .udp)
        udp = conn
        conn.start(queue: queue)
        receiveUDP()
        readTunnel()
        scheduleTimer()
        return nil
    }

    /// Relay → agent: batch what arrived into one FFI call.
    private func receiveUDP() {
        udp?.receiveMessage { [weak self] data, _, _, _ in
            guard let self, let agent = self.agent, var bytes = data.map({ [UInt8]($0) }) else { return }
            bytes.withUnsafeMutableBufferPointer { buf in
                var d = ZtnaDatagram(data: buf.baseAddress, len: buf.count, cap: buf.count,
                                     addr: ZtnaAddr(family: 4, ip: (203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                                                    port: self.relayPort))
                _ = ztna_agent_recv_udp(agent, &d, 1, self.nowUs())
            }
            self.flush()
            self.receiveUDP()
        }
    }

    /// Tunnel → agent: all packets of one read in one ztna_agent_send_ip call.
    private func readTunnel() {
        packetFlow.readPackets { [weak self] packets, _ in
            guard let self else { return }
            self.queue.async {
                guard let agent = self.agent else { return }
                var storage = packets.map { [UInt8]($0) }
                var descs = [ZtnaPacket]()
                for i in storage.indices {
                    storage[i].withUnsafeMutableBufferPointer { b in
                        descs.append(ZtnaPacket(data: b.baseAddress, len: b.count, cap: b.count))
                    }
                }
                _ = ztna_agent_send_ip(agent, &descs, descs.count, nil)
                withExtendedLifetime(storage) {}
                self.flush()
                self.readTunnel()
            }
        }
    }

    /// Agent → relay and agent → tunnel, in batches of 32.
    private func flush() {
        guard let agent else { return }
        var buffers = [[UInt8]](repeating: [UInt8](repeating: 0, count: 1500), count: 32)
        var out = [ZtnaDatagram]()
        for i in buffers.indices {
            buffers[i].withUnsafeMutableBufferPointer { b in
                out.append(ZtnaDatagram(data: b.baseAddress, len: 0, cap: b.count,
                                        addr: ZtnaAddr(family: 0, ip: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), port: 0)))
            }
        }
        while true {
            let n = ztna_agent_poll_udp(agent, &out, out.count, nowUs())
            if n <= 0 { break }
            // This example's one NWConnection reaches the relay only, so
            // datagrams the core addresses to a connector directly (direct
            // paths, docs/apple.md) are not sent: the sessions stay on the
            // relay. A BSD UDP socket (sendto to d.addr) carries both.
            for d in out.prefix(Int(n)) where d.addr.port == relayPort {
                udp?.send(content: Data(bytes: d.data, count: d.len), completion: .idempotent)
            }
            if n < out.count { break }
        }
        var pk = [ZtnaPacket]()
        for i in buffers.indices {
            buffers[i].withUnsafeMutableBufferPointer { b in pk.append(ZtnaPacket(data: b.baseAddress, len: 0, cap: b.count)) }
        }
        while true {
            let n = ztna_agent_poll_ip(agent, &pk, pk.count)
            if n <= 0 { break }
            let packets = pk.prefix(Int(n)).map { Data(bytes: $0.data, count: $0.len) }
            packetFlow.writePackets(packets, withProtocols: packets.map { _ in AF_INET as NSNumber })
            if n < pk.count { break }
        }
        withExtendedLifetime(buffers) {}
        var ev = ZtnaEvent()
        while ztna_agent_poll_event(agent, &ev) == 1 {
            let text = withUnsafeBytes(of: ev.text) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            switch ev.kind {
            case UInt32(ZTNA_EVENT_SESSION_UP): NSLog("ztna end-to-end session up, connector %@", text)
            case UInt32(ZTNA_EVENT_SESSION_CLOSED): NSLog("ztna end-to-end session closed: %@", text)
            case UInt32(ZTNA_EVENT_PATH_CHANGED):
                // This example's one NWConnection talks to the relay only,
                // so its sessions stay there; the text says why (API 3.3).
                NSLog("ztna path: %@ (%@)", ev.addr.family == 0 ? "relay" : "direct", text)
            case UInt32(ZTNA_EVENT_DISCONNECTED):
                // The whole reason (the event's text is cut at its buffer):
                // show it to the user, e.g. a relay certificate that does not
                // cover server_name.
                var reason = [CChar](repeating: 0, count: 1024)
                _ = ztna_agent_last_failure(agent, &reason, reason.count)
                NSLog("ztna disconnected (retry in %llu ms): %@", ev.retry_in_ms, String(cString: reason))
            default: NSLog("ztna event %u code %u", ev.kind, ev.code)
            }
        }
    }

    private func scheduleTimer() {
        let t = DispatchSource.makeTimerSource(queue: queue)
        t.schedule(deadline: .now(), repeating: .milliseconds(10))
        t.setEventHandler { [weak self] in
            guard let self, let agent = self.agent else { return }
            var deadline: UInt64 = 0
            if ztna_agent_next_timeout(agent, &deadline) == 1, deadline <= self.nowUs() {
                _ = ztna_agent_on_timeout(agent, self.nowUs())
                self.flush()
            }
        }
        t.resume()
        timer = t
    }

    override func stopTunnel(with reason: NEProviderStopReason, completionHandler: @escaping () -> Void) {
        queue.async {
            self.timer?.cancel()
            self.udp?.cancel()
            if let agent = self.agent { ztna_agent_free(agent) }
            self.agent = nil
            completionHandler()
        }
    }
}
