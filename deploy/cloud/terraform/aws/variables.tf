variable "name" {
  description = "Name tag of the instance; prefix of the security group name."
  type        = string
  default     = "ztna-relay-1"
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-central-1"
}

variable "architecture" {
  description = "CPU architecture of the AMI and of the binaries at release_url: x86_64 or arm64."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "instance_type" {
  description = "EC2 instance type; must match architecture (c7i/c6i: x86_64, c7g/c6g: arm64). The relay runs one worker per vCPU."
  type        = string
  default     = "c6i.large"
}

variable "ami_id" {
  description = "AMI to boot. Empty: the newest official Debian 12 AMI for architecture."
  type        = string
  default     = ""
}

variable "vpc_id" {
  description = "VPC of the security group. Empty: the region's default VPC (then subnet_id may stay empty too)."
  type        = string
  default     = ""
}

variable "subnet_id" {
  description = "Public subnet of the instance. Required when vpc_id is set."
  type        = string
  default     = ""
}

variable "key_name" {
  description = "Existing EC2 key pair for SSH as the image's default user (admin). Empty: no key pair."
  type        = string
  default     = ""
}

variable "admin_cidrs" {
  description = "Source CIDRs (IPv4 or IPv6) allowed to reach SSH (TCP 22) and the metrics/health port (TCP 9090)."
  type        = list(string)

  validation {
    condition     = length(var.admin_cidrs) > 0 && alltrue([for c in var.admin_cidrs : can(cidrhost(c, 0))])
    error_message = "admin_cidrs must list at least one valid CIDR, e.g. [\"198.51.100.7/32\"]."
  }

  validation {
    condition     = !contains(var.admin_cidrs, "0.0.0.0/0") && !contains(var.admin_cidrs, "::/0")
    error_message = "admin_cidrs must not open SSH and metrics to the whole Internet."
  }
}

variable "client_cidrs" {
  description = "Source CIDRs (IPv4 or IPv6) allowed to reach the relay (UDP 4433) and the connector port (UDP 4434)."
  type        = list(string)
  default     = ["0.0.0.0/0", "::/0"]

  validation {
    condition     = alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "client_cidrs must be valid CIDRs."
  }
}

variable "assign_eip" {
  description = "Give the instance an Elastic IP that survives re-creating it."
  type        = bool
  default     = false
}

variable "root_volume_gb" {
  description = "Size of the (encrypted, gp3) root volume."
  type        = number
  default     = 10
}

variable "trust_domain" {
  description = "Trust domain of the organisation's SPIFFE IDs (spiffe://<trust_domain>/...)."
  type        = string
}

variable "relay_cert_pem" {
  description = "PEM certificate chain of the relay (ztna-relay ca issue --kind relay)."
  type        = string
}

variable "relay_key_pem" {
  description = "PEM private key of the relay. Travels in user data and the Terraform state (see README). Empty: copy it over SSH after boot."
  type        = string
  default     = ""
  sensitive   = true
}

variable "client_ca_pem" {
  description = "PEM bundle of the organisation CA that signs agent and connector certificates (the certificate only, never ca.key)."
  type        = string
}

variable "policy_toml" {
  description = "Relay policy file (default deny; see dataplane/relay/src/policy.rs)."
  type        = string
}

variable "release_url" {
  description = "Base URL serving the ztna-relay and ztna-tune binaries for architecture. Empty: copy them to /usr/local/bin over SSH."
  type        = string
  default     = ""

  validation {
    condition     = var.release_url == "" || can(regex("^https://[^'\\s]+$", var.release_url))
    error_message = "release_url must be empty or an https:// URL without quotes or spaces."
  }
}

variable "relay_sha256" {
  description = "SHA-256 of the ztna-relay binary at release_url (required when release_url is set)."
  type        = string
  default     = ""

  validation {
    condition     = var.relay_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.relay_sha256))
    error_message = "relay_sha256 must be 64 lowercase hex digits."
  }
}

variable "tune_sha256" {
  description = "SHA-256 of the ztna-tune binary at release_url (required when release_url is set)."
  type        = string
  default     = ""

  validation {
    condition     = var.tune_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.tune_sha256))
    error_message = "tune_sha256 must be 64 lowercase hex digits."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
