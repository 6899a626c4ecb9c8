"""Consortium PKI: a CA, the coordinator's TLS certificate, and one node-authentication key pair per site.

Layout written by `init_certs(out_dir, sites, hosts)` (private keys 0600, written atomically, never logged):

    ca.pem, ca.key                      consortium CA (keep ca.key offline after init)
    coordinator.pem, coordinator.key    SuperLink TLS certificate (SANs: `hosts`) and key
    sites/<site>/node.key, node.pub     the site's SuperNode auth key pair (EC P-384, OpenSSH format:
                                        `flower-supernode --auth-supernode-private-key`, `flwr supernode register`)

A site needs only `ca.pem` and its own `sites/<site>/` folder; the coordinator needs `ca.pem`,
`coordinator.pem/.key` and every site's `node.pub` (to register it). See docs/PRIVACY.md.

`init_certs` never replaces an existing consortium (a new CA would lock out every site); `add_site` gives an
existing consortium one more site key pair (`fedrad certs add-site NAME`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fedrad.common.atomic import atomic_write_bytes
from fedrad.deploy.processes import TlsFiles

PathLike = str | os.PathLike[str]
CA_DAYS = 3650
LEAF_DAYS = 825


def _write_private(path: Path, data: bytes) -> None:
    """A secret: mode 0600 from the first byte, written atomically."""
    atomic_write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o644)


def _san_entries(hosts: list[str]):
    from cryptography import x509

    out = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _check_site_name(site: str) -> str:
    site = site.strip()
    if not site or "/" in site or site.startswith(".") or "\\" in site:
        raise ValueError(f"site name {site!r} must be a plain folder name")
    return site


def init_certs(out_dir: Path | str, sites: list[str], hosts: list[str] | None = None) -> None:
    """Make the consortium CA, a coordinator certificate for `hosts` and an auth key pair per site.

    Refuses (ValueError, exit 2) a folder that already holds a consortium CA: replacing it would change the
    coordinator's TLS and every site's key; `add_site` adds a site to it instead.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    hosts = list(hosts or ["localhost", "127.0.0.1", "::1"])
    sites = [_check_site_name(s) for s in sites]
    if (out / "ca.pem").exists() or (out / "ca.key").exists():
        raise ValueError(f"{out} already holds a consortium CA: `fedrad certs init` never replaces it (every site's "
                         f"key and the coordinator's certificate would change); add a site with `fedrad certs "
                         f"add-site NAME --certs {out}`, or start a new consortium in another folder")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM
    no_pw = serialization.NoEncryption()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrad consortium CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    srv_key = ec.generate_private_key(ec.SECP384R1())
    cn = next((h for h in hosts if h.strip()), "localhost")
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw))
    _write_public(out / "ca.pem", ca_cert.public_bytes(pem))
    _write_private(out / "coordinator.key", srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_pw))
    _write_public(out / "coordinator.pem", srv_cert.public_bytes(pem))
    for site in sites:
        _write_site(out / "sites" / site, site, ca_cert.public_bytes(pem))
    os.chmod(out, 0o700)


def _write_site(folder: Path, site: str, ca_pem: bytes) -> None:
    """A site's folder: its SuperNode auth key pair (EC P-384, OpenSSH) and the consortium CA."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    node_key = ec.generate_private_key(ec.SECP384R1())
    _write_private(folder / "node.key", node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    _write_public(folder / "node.pub", node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" fedrad-{site}\n".encode())
    _write_public(folder / "ca.pem", ca_pem)


def add_site(certs_dir: Path | str, site: str) -> Path:
    """Add one site to an existing consortium: `sites/<site>/` with a new key pair and the CA; the CA, the
    coordinator's certificate and every other site stay as they are. Returns the site's folder."""
    root = Path(certs_dir)
    site = _check_site_name(site)
    if not (root / "ca.pem").is_file():
        raise FileNotFoundError(f"{root / 'ca.pem'}: no consortium CA here (run `fedrad certs init` first)")
    folder = root / "sites" / site
    if folder.exists():
        raise ValueError(f"site {site} already exists in {root / 'sites'}: its key is never replaced (remove the "
                         f"folder and re-register the new key to rotate it)")
    _write_site(folder, site, (root / "ca.pem").read_bytes())
    return folder


def tls_files(certs_dir: Path | str, site: str | None = None) -> TlsFiles:
    """Paths for the coordinator (`site=None`) or for one site's SuperNode; checks they exist."""
    root = Path(certs_dir).resolve()
    ca = root / "ca.pem"
    if site is None:
        files = TlsFiles(ca_cert=ca, server_cert=root / "coordinator.pem", server_key=root / "coordinator.key")
        needed = [files.ca_cert, files.server_cert, files.server_key]
    else:
        folder = root / "sites" / _check_site_name(site)
        if not folder.is_dir() and (root / "node.key").exists():
            folder = root  # a site's own copy: ca.pem + node.key + node.pub in one folder
        if not ca.exists() and (folder / "ca.pem").exists():
            ca = folder / "ca.pem"
        files = TlsFiles(ca_cert=ca, node_private_key=folder / "node.key", node_public_key=folder / "node.pub")
        needed = [files.ca_cert, files.node_private_key]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"certificate files missing (run `fedrad certs init`): {', '.join(missing)}")
    return files


def register_node(pubkey_path: Path | str, superlink_address: str, certs_dir: Path | str,
                  timeout: float = 60.0, name: str | None = None) -> str:
    """Enrol a site's public key with the SuperLink (`flwr supernode register`) over TLS; returns flwr's output.

    The node is enrolled under `name` (default: the site's folder, `sites/<name>/node.pub`), which the
    coordinator shows in its logs, metrics and plots instead of the node id (fedrad.server.site_names).
    """
    from fedrad.deploy.flower_cli import write_flwr_home
    from fedrad.deploy.processes import flower_env, tool

    pub = Path(pubkey_path).resolve()
    if not pub.exists():
        raise FileNotFoundError(f"public key {pub} does not exist")
    ca = Path(certs_dir).resolve() / "ca.pem"
    if not ca.exists():
        raise FileNotFoundError(f"{ca}: no consortium CA (run `fedrad certs init`)")
    name = name or (pub.parent.name if pub.name == "node.pub" else None)
    named = ["--name", _check_site_name(name)] if name else []
    with tempfile.TemporaryDirectory(prefix="fedrad-flwr-") as home:
        write_flwr_home(Path(home), superlink_address, ca)
        env = flower_env({"FLWR_HOME": home})
        last = ""
        deadline = _now() + timeout
        while True:  # the SuperLink may still be starting its Control API
            proc = subprocess.run([tool("flwr"), "supernode", "register", str(pub), "fedrad", *named], env=env,
                                  capture_output=True, text=True, timeout=timeout)
            last = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0:
                return last
            if "already" in last.lower():
                return last
            if _now() > deadline:
                raise RuntimeError(f"`flwr supernode register {pub}` failed ({proc.returncode}): "
                                   f"{_one_line(last)[-800:]}")
            import time

            time.sleep(1.0)


def _one_line(flwr_output: str) -> str:
    """Flower's output with its rich error panels folded, as one line (the reason, not a box on a terminal)."""
    from fedrad.deploy.flower_cli import FlowerBox

    box, parts = FlowerBox(), []
    for line in flwr_output.splitlines():
        if box.feed(line):
            parts += [box.message] if box.message else []
        elif line.strip():
            parts.append(line.strip())
    return "; ".join(parts)


def _now() -> float:
    import time

    return time.time()


# --- CLI handlers ----------------------------------------------------------------------------------


def certs_init_main(*, out: PathLike = "fedrad-certs", sites: str = "site-a,site-b,site-c",
                    hosts: str = "localhost,127.0.0.1,::1") -> int:
    """`fedrad certs init`: a CA, the coordinator's certificate for `hosts` and node keys for `sites` (both
    comma-separated) under `out`; prints what goes where."""
    site_names = [s for s in str(sites).split(",") if s.strip()]
    host_names = [h for h in str(hosts).split(",") if h.strip()]
    init_certs(Path(out), site_names, host_names)
    root = Path(out).resolve()
    print(f"fedrad certs: CA and coordinator certificate (SANs: {', '.join(host_names)}) in {root}; node key pairs "
          f"for {', '.join(site_names)} in {root / 'sites'}.\n"
          f"  coordinator: fedrad coordinator --certs {root} --host 0.0.0.0\n"
          f"  register each site: fedrad certs register {root}/sites/SITE/node.pub --certs {root} "
          "--superlink HOST:8000\n"
          f"  give site SITE the folder {root}/sites/SITE (ca.pem, node.key, node.pub) only; keep ca.key offline.")
    return 0


def add_site_main(name: str, *, certs: PathLike = "fedrad-certs") -> int:
    """`fedrad certs add-site NAME`: a new site's node key pair under the existing CA in `certs`."""
    folder = add_site(Path(certs), name)
    root = Path(certs).resolve()
    print(f"fedrad certs: site {name} added to the consortium in {root} ({folder.resolve()}: ca.pem, node.key, "
          f"node.pub).\n  register it: fedrad certs register {folder.resolve() / 'node.pub'} --certs {root} "
          f"--superlink HOST:8000\n  give site {name} the folder {folder.resolve()} only.")
    return 0


def register_main(pubkey: PathLike, *, certs: PathLike, superlink: str = "127.0.0.1:8000",
                  site_name: str | None = None) -> int:
    """`fedrad certs register PUBKEY`: enrol a site's node public key at the coordinator; 1 when it could not."""
    try:
        text = register_node(Path(pubkey), superlink, Path(certs), name=site_name)
    except RuntimeError as exc:  # the coordinator could not be reached or refused: Flower's reason, one line
        print(f"fedrad certs register: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"fedrad certs register: {Path(pubkey).name} enrolled at {superlink}\n{text}")
    return 0


def tls_from(certs: PathLike | None, site: str | None = None) -> TlsFiles | None:
    """The coordinator's TLS files (`site=None`) from a `fedrad certs init` folder."""
    if not certs:
        return None
    return tls_files(Path(certs), site)
