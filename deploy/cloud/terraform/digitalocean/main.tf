locals {
  tag = "${var.name}-ztna-relay"

  public_ipv4 = var.reserved_ip ? digitalocean_reserved_ip.relay[0].ip_address : digitalocean_droplet.relay.ipv4_address

  # Placeholders of deploy/cloud/cloud-init/relay.yaml (the same list as the
  # AWS module; deploy/ci/check-ops.sh checks both against the template).
  user_data = templatefile("${path.module}/../../cloud-init/relay.yaml", {
    trust_domain   = var.trust_domain
    relay_cert_b64 = base64encode(var.relay_cert_pem)
    relay_key_b64  = base64encode(var.relay_key_pem)
    client_ca_b64  = base64encode(var.client_ca_pem)
    policy_b64     = base64encode(var.policy_toml)
    release_url    = trimsuffix(var.release_url, "/")
    relay_sha256   = var.relay_sha256
    tune_sha256    = var.tune_sha256
  })
}

resource "digitalocean_tag" "relay" {
  name = local.tag
}

resource "digitalocean_droplet" "relay" {
  name       = var.name
  region     = var.region
  size       = var.size
  image      = var.image
  ipv6       = true
  monitoring = true
  ssh_keys   = var.ssh_key_fingerprints
  tags       = concat([digitalocean_tag.relay.id], var.tags)
  user_data  = local.user_data

  lifecycle {
    precondition {
      condition     = var.release_url == "" || (var.relay_sha256 != "" && var.tune_sha256 != "")
      error_message = "release_url needs relay_sha256 and tune_sha256: the bootstrap refuses unverified binaries."
    }
  }
}

resource "digitalocean_reserved_ip" "relay" {
  count      = var.reserved_ip ? 1 : 0
  region     = var.region
  droplet_id = digitalocean_droplet.relay.id
}

resource "digitalocean_firewall" "relay" {
  name = "${var.name}-fw"
  tags = [digitalocean_tag.relay.id]

  # QUIC to the relay (agents and connectors).
  inbound_rule {
    protocol         = "udp"
    port_range       = "4433"
    source_addresses = var.client_cidrs
  }

  # The connector's fixed UDP port, for a connector on this host and for
  # direct (peer-to-peer) paths.
  inbound_rule {
    protocol         = "udp"
    port_range       = "4434"
    source_addresses = var.client_cidrs
  }

  # /metrics, /healthz, /readyz: admins and Prometheus only.
  inbound_rule {
    protocol         = "tcp"
    port_range       = "9090"
    source_addresses = var.admin_cidrs
  }

  inbound_rule {
    protocol         = "tcp"
    port_range       = "22"
    source_addresses = var.admin_cidrs
  }

  # Path MTU discovery and diagnostics.
  inbound_rule {
    protocol         = "icmp"
    source_addresses = ["0.0.0.0/0", "::/0"]
  }

  outbound_rule {
    protocol              = "udp"
    port_range            = "1-65535"
    destination_addresses = ["0.0.0.0/0", "::/0"]
  }

  outbound_rule {
    protocol              = "tcp"
    port_range            = "1-65535"
    destination_addresses = ["0.0.0.0/0", "::/0"]
  }

  outbound_rule {
    protocol              = "icmp"
    destination_addresses = ["0.0.0.0/0", "::/0"]
  }
}
