output "instance_id" {
  description = "ID of the relay instance."
  value       = aws_instance.relay.id
}

output "public_ip" {
  description = "Address clients use: the Elastic IP when assigned, else the instance's public IP."
  value       = local.public_ip
}

output "relay_endpoint" {
  description = "host:port for agent and connector configs (relay = / relays = [...])."
  value       = "${local.public_ip}:4433"
}

output "metrics_url" {
  description = "Prometheus scrape target (reachable from admin_cidrs only)."
  value       = "http://${local.public_ip}:9090/metrics"
}

output "security_group_id" {
  description = "ID of the relay's security group."
  value       = aws_security_group.relay.id
}

output "ami_id" {
  description = "The AMI the instance booted."
  value       = local.ami_id
}
