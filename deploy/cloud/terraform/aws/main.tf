locals {
  # Placeholders of deploy/cloud/cloud-init/relay.yaml (the same list as the
  # DigitalOcean module; deploy/ci/check-ops.sh checks both against the
  # template).
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

  # Security groups take IPv4 and IPv6 ranges in separate lists.
  admin_v4  = [for c in var.admin_cidrs : c if !strcontains(c, ":")]
  admin_v6  = [for c in var.admin_cidrs : c if strcontains(c, ":")]
  client_v4 = [for c in var.client_cidrs : c if !strcontains(c, ":")]
  client_v6 = [for c in var.client_cidrs : c if strcontains(c, ":")]

  ami_id = var.ami_id != "" ? var.ami_id : data.aws_ami.debian[0].id
  vpc_id = var.vpc_id != "" ? var.vpc_id : data.aws_vpc.default[0].id

  public_ip = var.assign_eip ? aws_eip.relay[0].public_ip : aws_instance.relay.public_ip
}

# The Debian project's official images (account 136693071363).
data "aws_ami" "debian" {
  count       = var.ami_id == "" ? 1 : 0
  most_recent = true
  owners      = ["136693071363"]

  filter {
    name   = "name"
    values = ["debian-12-${var.architecture == "arm64" ? "arm64" : "amd64"}-*"]
  }

  filter {
    name   = "architecture"
    values = [var.architecture]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

data "aws_vpc" "default" {
  count   = var.vpc_id == "" ? 1 : 0
  default = true
}

resource "aws_security_group" "relay" {
  name_prefix = "${var.name}-"
  description = "ZTNA relay: QUIC from clients; SSH and metrics from admins"
  vpc_id      = local.vpc_id

  ingress {
    description      = "QUIC to the relay"
    protocol         = "udp"
    from_port        = 4433
    to_port          = 4433
    cidr_blocks      = local.client_v4
    ipv6_cidr_blocks = local.client_v6
  }

  ingress {
    description      = "connector UDP port (co-located connector, direct paths)"
    protocol         = "udp"
    from_port        = 4434
    to_port          = 4434
    cidr_blocks      = local.client_v4
    ipv6_cidr_blocks = local.client_v6
  }

  ingress {
    description      = "metrics, healthz, readyz"
    protocol         = "tcp"
    from_port        = 9090
    to_port          = 9090
    cidr_blocks      = local.admin_v4
    ipv6_cidr_blocks = local.admin_v6
  }

  ingress {
    description      = "SSH"
    protocol         = "tcp"
    from_port        = 22
    to_port          = 22
    cidr_blocks      = local.admin_v4
    ipv6_cidr_blocks = local.admin_v6
  }

  # Path MTU discovery: ICMP type 3 code 4 (fragmentation needed) and
  # ICMPv6 type 2 (packet too big).
  ingress {
    description = "ICMP fragmentation needed"
    protocol    = "icmp"
    from_port   = 3
    to_port     = 4
    cidr_blocks = ["0.0.0.0/0"]
  }

  ingress {
    description      = "ICMPv6 packet too big"
    protocol         = "58"
    from_port        = 2
    to_port          = 0
    ipv6_cidr_blocks = ["::/0"]
  }

  egress {
    description      = "everything out (clients, package mirrors, release_url)"
    protocol         = "-1"
    from_port        = 0
    to_port          = 0
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_instance" "relay" {
  ami                         = local.ami_id
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id != "" ? var.subnet_id : null
  key_name                    = var.key_name != "" ? var.key_name : null
  vpc_security_group_ids      = [aws_security_group.relay.id]
  associate_public_ip_address = true
  user_data                   = local.user_data
  user_data_replace_on_change = true

  # IMDSv2 only, one hop: containers on the host cannot read the user data
  # (which may carry the relay key) through the metadata service.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type = "gp3"
    volume_size = var.root_volume_gb
    encrypted   = true
  }

  tags = {
    Name = var.name
  }

  lifecycle {
    precondition {
      condition     = var.vpc_id == "" || var.subnet_id != ""
      error_message = "subnet_id is required when vpc_id is set."
    }
    precondition {
      condition     = var.release_url == "" || (var.relay_sha256 != "" && var.tune_sha256 != "")
      error_message = "release_url needs relay_sha256 and tune_sha256: the bootstrap refuses unverified binaries."
    }
    precondition {
      condition     = length(local.user_data) <= 16384
      error_message = "EC2 user data is limited to 16 KiB; shorten the policy or certificate chain, or copy them over SSH."
    }
  }
}

resource "aws_eip" "relay" {
  count    = var.assign_eip ? 1 : 0
  domain   = "vpc"
  instance = aws_instance.relay.id

  tags = {
    Name = var.name
  }
}
