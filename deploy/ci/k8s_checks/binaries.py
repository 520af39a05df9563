"""The real binaries' `check-config` on the rendered configs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

from k8s_checks.common import BINARIES, ROOT, Problems


def find_bin_dir() -> tuple[Path | None, str]:
    """A directory with this repository's ztna-relay and ztna-connector: (dir, "") or (None, why not)."""
    if os.environ.get("ZTNA_BIN_DIR"):
        dirs = [Path(os.environ["ZTNA_BIN_DIR"])]
    else:
        tops = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
        tops.append(ROOT / "target")
        dirs = [t / p for t in tops for p in ("debug", "release")]
    found = [d for d in dirs if all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in BINARIES)]
    if not found:
        return None, f"no {' and '.join(BINARIES)} in {', '.join(str(d) for d in dirs)}"
    # The newest build, when both exist.
    return max(found, key=lambda d: min((d / b).stat().st_mtime for b in BINARIES)), ""


class BinaryCheck:
    """Runs `ztna-relay check-config` and `ztna-connector check-config` on rendered configs."""

    def __init__(self, bindir: Path, workdir: Path) -> None:
        self.bindir = bindir
        self.workdir = workdir
        self.pki: dict[str, Path] = {}
        self.runs = 0

    def _run(self, args: list[str]) -> tuple[int, str]:
        env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0", RUST_LOG="error")
        p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=self.workdir)
        self.runs += 1
        lines = [x.strip() for x in (p.stderr + p.stdout).splitlines() if x.strip() not in ("", "|")]
        if "Stack backtrace:" in lines:
            lines = lines[:lines.index("Stack backtrace:")]
        return p.returncode, " | ".join(lines[-6:])

    def _ca(self, trust_domain: str) -> Path:
        """A throw-away CA and relay certificate for the trust domain (cached per run)."""
        if trust_domain not in self.pki:
            d = Path(tempfile.mkdtemp(prefix="pki-", dir=self.workdir))
            r = str(self.bindir / "ztna-relay")
            for args in (["ca", "init", "--dir", str(d), "--trust-domain", trust_domain],
                         ["ca", "issue", "--dir", str(d), "--trust-domain", trust_domain,
                          "--kind", "relay", "--name", "relay", "--dns", "relay.example.org"],
                         ["ca", "issue", "--dir", str(d), "--trust-domain", trust_domain,
                          "--kind", "connector", "--name", "check"]):
                rc, out = self._run([r] + args)
                if rc != 0:
                    raise RuntimeError(f"ztna-relay {' '.join(args[:2])} failed: {out}")
            self.pki[trust_domain] = d
        return self.pki[trust_domain]

    @staticmethod
    def _with_config(args: list[str], path: Path) -> list[str]:
        out, skip = [], False
        for a in args:
            if skip:
                out.append(str(path))
                skip = False
            elif a == "--config":
                out.append(a)
                skip = True
            elif a.startswith("--config="):
                out.append(f"--config={path}")
            else:
                out.append(a)
        return out

    def _lay_out(self, prefix: str, text: str, toml: dict, files: dict[str, Path],
                 extra: dict[str, str | None]) -> tuple[Path, str]:
        """A temporary root with `files` (certificate material) and `extra` (text files, None = skip)
        at the absolute paths the config names; returns the root and the config text pointing there."""
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=self.workdir))
        for key in list(files) + list(extra):
            v = toml.get(key)
            if not isinstance(v, str) or not v.startswith("/"):
                continue
            dest = root / v.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if key in extra:
                if extra[key] is None:
                    continue
                dest.write_text(extra[key] or "")
            else:
                shutil.copyfile(files[key], dest)
            text = re.sub(r"""(["'])""" + re.escape(v) + r"\1", lambda m: m.group(1) + str(dest) + m.group(1), text)
        return root, text

    def _pki(self, trust_domain: str, what: str, pr: Problems) -> Path | None:
        try:
            return self._ca(trust_domain)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            pr.err(f"{what} check-config: cannot make a test CA: {e}")
            return None

    def relay(self, relay_text: str, relay_toml: dict, policy_text: str | None, args: list[str],
              cfg_path: str, pr: Problems) -> None:
        """The relay's files laid out under a temporary root: relay.toml, policy.toml, and
        a throw-away CA's certificate, key and CA in place of the Secret's files."""
        pki = self._pki(str(relay_toml.get("trust_domain") or "example.org"), "ztna-relay", pr)
        if pki is None:
            return
        files = {"cert": pki / "relay-relay.pem", "key": pki / "relay-relay.key", "client_ca": pki / "ca.pem"}
        root, text = self._lay_out("relay-", relay_text, relay_toml, files, {"policy": policy_text})
        cfg = root / cfg_path.lstrip("/")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(text)
        cmd = [str(self.bindir / "ztna-relay"), "check-config"] + self._with_config(args, cfg)
        rc, out = self._run(cmd)
        if rc != 0:
            pr.err(f"ztna-relay check-config rejects the rendered relay.toml/policy.toml (args {args}): {out}")

    def connector(self, text: str, args: list[str], cfg_path: str, pr: Problems) -> None:
        """check-config resolves no names; it reads the certificate files, so a throw-away CA's
        connector certificate, key and CA stand in for the Secret's files."""
        try:
            toml = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            pr.err(f"ztna-connector: the rendered connector.toml is not TOML: {e}")
            return
        pki = self._pki("example.org", "ztna-connector", pr)
        if pki is None:
            return
        files = {"cert": pki / "connector-check.pem", "key": pki / "connector-check.key", "ca": pki / "ca.pem"}
        root, text = self._lay_out("connector-", text, toml, files, {})
        cfg = root / cfg_path.lstrip("/")
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(text)
        cmd = [str(self.bindir / "ztna-connector"), "check-config"] + self._with_config(args, cfg)
        rc, out = self._run(cmd)
        if rc != 0:
            pr.err(f"ztna-connector check-config rejects the rendered connector.toml (args {args}): {out}")
