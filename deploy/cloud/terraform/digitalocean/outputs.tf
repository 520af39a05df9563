output "droplet_id" {
  description = "ID of the relay droplet."
  value       = digitalocean_droplet.relay.id
}

output "public_ipv4" {
  description = "Address clients use: the reserved IP when assigned, else the droplet's own."
  value       = local.public_ipv4
}

output "public_ipv6" {
  description = "The droplet's IPv6 address."
  value       = digitalocean_droplet.relay.ipv6_address
}

output "relay_endpoint" {
  description = "host:port for agent and connector configs (relay = / relays = [...])."
  value       = "${local.public_ipv4}:4433"
}

output "metrics_url" {
  description = "Prometheus scrape target (reachable from admin_cidrs only)."
  value       = "http://${local.public_ipv4}:9090/metrics"
}

output "firewall_id" {
  description = "ID of the firewall attached through the droplet's tag."
  value       = digitalocean_firewall.relay.id
}
