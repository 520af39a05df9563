variable "name" {
  description = "Droplet name; also the prefix of the firewall name and tag."
  type        = string
  default     = "ztna-relay-1"
}

variable "region" {
  description = "DigitalOcean region slug."
  type        = string
  default     = "fra1"
}

variable "size" {
  description = "Droplet size slug. The relay scales with cores (one worker per core)."
  type        = string
  default     = "s-2vcpu-4gb"
}

variable "image" {
  description = "Image slug; the cloud-init template expects Debian 12 or Ubuntu 22.04+."
  type        = string
  default     = "debian-12-x64"
}

variable "ssh_key_fingerprints" {
  description = "Fingerprints or IDs of SSH keys already in the DigitalOcean account, installed for root."
  type        = list(string)
  default     = []
}

variable "admin_cidrs" {
  description = "Source CIDRs allowed to reach SSH (TCP 22) and the metrics/health port (TCP 9090)."
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
  description = "Source CIDRs allowed to reach the relay (UDP 4433) and the connector port (UDP 4434)."
  type        = list(string)
  default     = ["0.0.0.0/0", "::/0"]
}

variable "reserved_ip" {
  description = "Assign a reserved (floating) IPv4 address that survives re-creating the droplet."
  type        = bool
  default     = false
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
  description = "Base URL serving the ztna-relay and ztna-tune binaries for the droplet's architecture. Empty: copy them to /usr/local/bin over SSH."
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
  description = "Extra droplet tags."
  type        = list(string)
  default     = []
}
