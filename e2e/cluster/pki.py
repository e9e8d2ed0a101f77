"""Certificates and keys of the local cluster, made with the `openssl` command line tool.

One CA signs everything: the API server's serving certificate, the client certificates of the
admin (``O=system:masters``), the controller-manager, the scheduler and the API server's kubelet
client identity (``kube-apiserver-kubelet-client``, what it shows the nodes' log endpoints), each
node's kubelet serving certificate (made by the node agent with ``ensure_leaf``, for its node
addresses), and (as kubeadm does) the controller-manager's cluster-signing requests. A separate
RSA key pair signs service-account tokens. Everything is generated once per state directory and
reused, so a warm start costs no key generation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Names under which in-cluster clients reach the API server; the serving certificate covers them all.
API_SERVER_SANS = (
    "IP:127.0.0.1",
    "IP:10.96.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Pki:
    """Paths of every certificate and key in ``<state>/pki``."""

    root: Path

    @property
    def ca_crt(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def crt(self, name: str) -> Path:
        return self.root / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"


# (file name, subject, extended key usage, subject alt names)
_LEAVES = (
    ("apiserver", "/CN=kube-apiserver", "serverAuth", API_SERVER_SANS),
    ("admin", "/O=system:masters/CN=relaunch-admin", "clientAuth", ()),
    ("controller-manager", "/CN=system:kube-controller-manager", "clientAuth", ()),
    ("scheduler", "/CN=system:kube-scheduler", "clientAuth", ()),
    ("apiserver-kubelet-client", "/CN=kube-apiserver-kubelet-client", "clientAuth", ()),
)


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError(
            "the `openssl` command is needed to generate the cluster's certificates; install it"
        )
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def ensure_pki(root: Path) -> Pki:
    """Create the CA, the service-account key pair and every leaf certificate that is missing."""
    pki = Pki(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (pki.ca_crt.exists() and pki.ca_key.exists()):
        _openssl(
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-sha256",
            "-days",
            "3650",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=relaunch-testbed-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=root,
        )
        # A new CA invalidates every leaf signed by an older one.
        for name, *_ in _LEAVES:
            pki.crt(name).unlink(missing_ok=True)
    if not (pki.sa_key.exists() and pki.sa_pub.exists()):
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=root)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=root)
    for name, subject, usage, sans in _LEAVES:
        if not (pki.crt(name).exists() and pki.key(name).exists()):
            _make_leaf(root, name, subject, usage, sans)
    for path in root.iterdir():
        if path.suffix == ".key":
            path.chmod(0o600)
    return pki


def _make_leaf(root: Path, name: str, subject: str, usage: str, sans: tuple[str, ...]) -> None:
    """A new key and a certificate for it, signed by the CA in ``root``."""
    with tempfile.TemporaryDirectory() as tmp:
        ext = Path(tmp) / "ext.cnf"
        lines = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usage}",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        csr = Path(tmp) / "req.csr"
        _openssl(
            "req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key", "-out", str(csr),
            "-subj", subject, cwd=root,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "3650", "-sha256", "-extfile", str(ext), "-out", f"{name}.crt", cwd=root,
        )  # fmt: skip
    (root / f"{name}.key").chmod(0o600)


def ensure_leaf(root: Path, name: str, subject: str, usage: str, sans: tuple[str, ...]) -> Pki:
    """``<name>.crt``/``.key`` in ``root`` for exactly this subject, usage and SANs, signed by the CA
    there now; made again when any of them changed (a node agent's addresses differ between runs).

    What the pair was made for is kept in ``<name>.spec`` (with the CA's fingerprint)."""
    pki = Pki(root)
    ca = hashlib.sha256(pki.ca_crt.read_bytes()).hexdigest()
    spec = json.dumps({"subject": subject, "usage": usage, "sans": list(sans), "ca": ca}, sort_keys=True)
    spec_file = root / f"{name}.spec"
    current = spec_file.read_text() if spec_file.exists() else None
    if current != spec or not (pki.crt(name).exists() and pki.key(name).exists()):
        _make_leaf(root, name, subject, usage, sans)
        spec_file.write_text(spec)
    return pki
