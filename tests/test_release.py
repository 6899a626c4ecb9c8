"""Signed bundles: keys are private, a good bundle verifies, and each kind of tampering fails distinctly."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
from release_fixtures import MODEL, SIZE, fedrad_cli, make_bundle, make_run_dir, one_line_error, resign, set_weights

from fedrad.common.bundle import BundleVerificationError, load_verified_backbone, verify_bundle
from fedrad.deploy.cli import main
from fedrad.server.release import generate_keys


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("rel"))


@pytest.fixture
def bundle_copy(signed, tmp_path):
    bundle, _key, pub = signed
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst, pub


@pytest.fixture
def signer_copy(signed, tmp_path):
    """(bundle copy, private key, public key): for bundles the consortium key signed but that are odd."""
    bundle, key, pub = signed
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst, key, pub


def test_private_key_is_0600_and_pub_is_pem(tmp_path):
    key, pub = generate_keys(tmp_path / "k" / "site")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert not list(key.parent.glob(".*.tmp"))  # no temp files left behind


def test_cli_keys_generate_refuses_overwrite(tmp_path, capsys):
    prefix = tmp_path / "c"
    assert main(["keys", "generate", "--out", str(prefix)]) == 0
    assert stat.S_IMODE((tmp_path / "c.key").stat().st_mode) == 0o600
    assert main(["keys", "generate", "--out", str(prefix)]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err


def test_verify_ok_and_manifest_contents(signed, capsys):
    bundle, _key, pub = signed
    m = verify_bundle(bundle, pub)
    assert m["model"] == MODEL and m["in_chans"] == 1 and m["input_size"] == SIZE
    assert m["intensity"] == "[0,1] grayscale, zero-padded square"
    assert m["rounds"] == 2 and m["sites"] == 3 and m["examples_seen"] == 2 * 3 * 3 * 8
    assert m["privacy"]["epsilon"] == "none" and m["privacy"]["secure_aggregation"] is False
    assert len(m["weights"]["sha256"]) == 64 and m["fedrad_version"]
    assert main(["verify", str(bundle), "--pubkey", str(pub)]) == 0
    out = capsys.readouterr().out
    assert "signature: valid" in out and "matches the manifest" in out


def test_model_card_is_signed_and_says_what_the_run_was(signed, capsys):
    """MODEL_CARD.md sits at the bundle root, the signed manifest lists its hash, `verify` says it checked it."""
    import hashlib

    bundle, _key, pub = signed
    card = (bundle / "MODEL_CARD.md").read_bytes()
    m = verify_bundle(bundle, pub)
    assert m["card"] == {"file": "MODEL_CARD.md", "sha256": hashlib.sha256(card).hexdigest(), "bytes": len(card)}
    from huggingface_hub import ModelCard

    text = ModelCard.load(bundle / "MODEL_CARD.md").text  # the Markdown after the Hugging Face front matter
    assert text.lstrip().startswith(f"# Model card: {MODEL}") and "release #1" in text
    assert "Objective: simclr (self-supervised: positives are two augmentations" in text
    assert "Rounds: 2 of 2 planned" in text
    # Sites by label (node ids never), the images each reported and those counted, its share, and the totals.
    assert "| site 1 | 20 | 20 | 33.3% | 2 |" in text and "3 sites; 60 images reported, 60 counted" in text
    assert "Modalities and views: not recorded" in text
    assert "Differential privacy: none" in text and "Secure aggregation (SecAgg+): off" in text
    assert "## Intended use" in text and "## Limits" in text and "not a medical device" in text
    assert "No fine-tuning results were attached" in text
    assert main(["verify", str(bundle), "--pubkey", str(pub)]) == 0
    assert "card:      MODEL_CARD.md sha256 " + m["card"]["sha256"] + " matches the manifest" in capsys.readouterr().out


def test_tampered_model_card_is_refused(bundle_copy, capsys):
    bundle, pub = bundle_copy
    card = bundle / "MODEL_CARD.md"
    card.write_text(card.read_text().replace("not a medical device", "a cleared medical device"))
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("model card mismatch") and "modified after signing" in err
    with pytest.raises(BundleVerificationError, match="model card mismatch"):
        load_verified_backbone(bundle, pub)  # a site loading the weights refuses it too
    card.unlink()
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("missing file") and "MODEL_CARD.md" in err


def test_model_card_shows_finetune_aucs_and_refuses_a_bad_results_file(tmp_path, capsys):
    from fedrad.server.release import release_bundle

    run = make_run_dir(tmp_path)
    key, pub = generate_keys(tmp_path / "k")
    results = tmp_path / "results.json"
    rows = [{"backbone": "fedrad", "mode": "linear", "fraction": 0.1, "train_patients": 4, "auc": 0.8125,
             "ci_low": 0.7, "ci_high": 0.9}, {"backbone": "random-init", "mode": "linear", "fraction": 0.1,
                                              "train_patients": 4, "auc": 0.6, "ci_low": 0.45, "ci_high": 0.75}]
    results.write_text(json.dumps({"meta": {"targets": ["pneumonia"], "mode": "linear", "data": "/secret/path"},
                                   "rows": rows}))
    bundle = release_bundle(run, key, tmp_path / "b", finetune_results=results)
    verify_bundle(bundle, pub)
    text = (bundle / "MODEL_CARD.md").read_text()
    assert "| fedrad | linear | 10% | 0.812 | [0.700, 0.900] |" in text
    assert "| random-init | linear | 10% | 0.600 | [0.450, 0.750] |" in text
    assert "targets: pneumonia" in text and "/secret/path" not in text
    bad = tmp_path / "bad.json"
    for content, problem in [("{", "not valid JSON"), ('{"rows": []}', "no 'rows' list"),
                             ('{"rows": [{"backbone": "x"}]}', "rows[0] lacks"),
                             (json.dumps({"rows": [{**rows[0], "auc": "high"}]}), "rows[0].auc is not a finite")]:
        bad.write_text(content)
        code = main(["release", str(run), "--key", str(key), "--out", str(tmp_path / "b2"),
                     "--finetune-results", str(bad)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and problem in err[0] and str(bad) in err[0], err
    assert not (tmp_path / "b2").exists()  # refused before anything was written


def test_timm_loads_weights_directly(signed):
    import timm
    import torch
    from safetensors.torch import load_file

    bundle, _key, pub = signed
    net = timm.create_model(MODEL, in_chans=1, num_classes=0)
    net.load_state_dict(load_file(bundle / "weights.safetensors"), strict=True)
    backbone, manifest = load_verified_backbone(bundle, pub)
    x = torch.rand(2, 1, SIZE, SIZE)
    net.eval()
    assert torch.allclose(net(x), backbone(x))
    assert manifest["model"] == MODEL


def _fails(bundle, pub, capsys) -> tuple[str, str]:
    with pytest.raises(BundleVerificationError) as exc:
        verify_bundle(bundle, pub)
    assert main(["verify", str(bundle), "--pubkey", str(pub)]) != 0
    return str(exc.value), capsys.readouterr().err


def test_tampered_weight_byte(bundle_copy, capsys):
    bundle, pub = bundle_copy
    w = bundle / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("weights hash mismatch") and "weights hash mismatch" in err


def test_tampered_manifest(bundle_copy, capsys):
    bundle, pub = bundle_copy
    m = json.loads((bundle / "manifest.json").read_text())
    m["rounds"] = 99
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("signature invalid") and "modified after signing" in msg and "modified" in err


def test_wrong_public_key(bundle_copy, tmp_path, capsys):
    bundle, _pub = bundle_copy
    _k, other = generate_keys(tmp_path / "other")
    msg, err = _fails(bundle, other, capsys)
    assert msg.startswith("signature invalid: wrong key") and "wrong key" in err


def test_missing_file(bundle_copy, capsys):
    bundle, pub = bundle_copy
    (bundle / "manifest.sig").unlink()
    msg, err = _fails(bundle, pub, capsys)
    assert msg.startswith("missing file") and "manifest.sig" in err


def test_finetune_refuses_a_tampered_bundle(bundle_copy, tmp_path, capsys):
    bundle, pub = bundle_copy
    (bundle / "weights.safetensors").write_bytes(b"x" + (bundle / "weights.safetensors").read_bytes()[1:])
    code = main(["finetune", str(bundle), "--pubkey", str(pub), "--data", str(tmp_path / "none.npz")])
    assert code == 1 and "verification FAILED" in capsys.readouterr().err


def test_dp_run_reports_epsilon(tmp_path):
    bundle, _k, pub = make_bundle(tmp_path, dp="client")
    p = verify_bundle(bundle, pub)["privacy"]
    assert p["differential_privacy"] == "client" and p["epsilon"] == 1.0 and p["delta"] == 1e-5


# -- the verify-then-load race (issue 12 item 5) ------------------------------------------------------
def _other_weights(tmp_path) -> bytes:
    """Valid weights for the same architecture, different values (what an attacker would swap in)."""
    run = make_run_dir(tmp_path / "evil", seed=123)
    return (run / "global.safetensors").read_bytes()


def test_weights_swapped_after_hashing_never_load_as_verified(bundle_copy, tmp_path, monkeypatch):
    """The file is replaced right after its bytes were hashed; the loader must use the hashed bytes."""
    import torch
    from safetensors.torch import load

    from fedrad.common import bundle as bundle_mod

    bundle, pub = bundle_copy
    signed_state = load((bundle / "weights.safetensors").read_bytes())
    evil = _other_weights(tmp_path)
    evil_state = load(evil)
    assert any(not torch.equal(signed_state[k], evil_state[k]) for k in signed_state)
    real_digest = bundle_mod._digest
    swaps = []

    def digest_then_swap(data: bytes) -> str:
        out = real_digest(data)
        (bundle / "weights.safetensors").write_bytes(evil)  # the attacker wins the race on disk
        swaps.append(1)
        return out

    monkeypatch.setattr(bundle_mod, "_digest", digest_then_swap)
    backbone, _m = load_verified_backbone(bundle, pub)
    assert swaps and (bundle / "weights.safetensors").read_bytes() == evil
    loaded = backbone.state_dict()
    for k, v in signed_state.items():
        assert torch.equal(loaded[k], v), k  # the signed weights, not the swapped ones
    monkeypatch.setattr(bundle_mod, "_digest", real_digest)
    with pytest.raises(BundleVerificationError, match="weights (hash|size) mismatch"):
        load_verified_backbone(bundle, pub)  # the swapped file itself is refused


def test_each_bundle_file_is_read_once(bundle_copy, monkeypatch):
    import builtins

    bundle, pub = bundle_copy
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *a, **kw):
        if str(file).startswith(str(bundle)):
            opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    load_verified_backbone(bundle, pub)
    assert sorted(opened) == sorted(str(bundle / n) for n in ("manifest.json", "manifest.sig",
                                                              "weights.safetensors", "MODEL_CARD.md", "config.json"))


@pytest.mark.parametrize("claimed", [2**70, 10**15, 0])
def test_signed_manifest_claiming_any_weights_size_is_refused_cleanly(signer_copy, claimed):
    """Fuzzing found it: a signed `weights.bytes` of 2**70 (OverflowError) or 10**15 (MemoryError) was used
    as the read size. The read is now sized by the file."""
    from fedrad.common.bundle import manifest_bytes

    bundle, key, pub = signer_copy
    m = json.loads((bundle / "manifest.json").read_text())
    m["weights"]["bytes"] = claimed
    resign(bundle, key, manifest_bytes(m))
    with pytest.raises(BundleVerificationError, match="weights"):
        verify_bundle(bundle, pub)


# -- rollback (issue 12 item 5) -----------------------------------------------------------------------
def test_release_sequence_and_rollback_refused(tmp_path, capsys):
    from fedrad.server.release import release_bundle

    run = make_run_dir(tmp_path)
    key, pub = generate_keys(tmp_path / "k" / "c")
    first = release_bundle(run, key, tmp_path / "b1")
    second = release_bundle(run, key, tmp_path / "b2")
    m1, m2 = verify_bundle(first, pub), verify_bundle(second, pub)
    assert m1["format"] == "fedrad-bundle/2" and m1["release"]["run_id"] == "1"
    assert (m1["release"]["sequence"], m2["release"]["sequence"]) == (1, 2)
    assert len((run / "releases.jsonl").read_text().splitlines()) == 2
    # the newer one passes every check a site may ask for
    assert main(["verify", str(second), "--pubkey", str(pub), "--expect-run", "1", "--min-sequence", "2",
                 "--min-created", "2020-01-01"]) == 0
    assert "release #2" in capsys.readouterr().out
    # the older one, signed by the same key, is refused when the site asks for the newer release
    assert main(["verify", str(first), "--pubkey", str(pub), "--min-sequence", "2"]) == 1
    assert "rollback refused" in capsys.readouterr().err
    assert main(["verify", str(second), "--pubkey", str(pub), "--expect-run", "7"]) == 1
    assert "not the expected run 7" in capsys.readouterr().err
    assert main(["verify", str(second), "--pubkey", str(pub), "--min-created", "2999-01-01"]) == 1
    assert "created" in capsys.readouterr().err
    assert main(["verify", str(second), "--pubkey", str(pub), "--min-created", "last tuesday"]) == 2
    assert "--min-created" in capsys.readouterr().err


def test_finetune_and_embed_refuse_an_older_release(signed, tmp_path, capsys):
    bundle, _key, pub = signed
    run_id = verify_bundle(bundle, pub)["release"]["run_id"]
    for cmd in ("finetune", "embed"):
        code = main([cmd, str(bundle), "--pubkey", str(pub), "--data", str(tmp_path / "x.npz"),
                     "--out", str(tmp_path / cmd), "--expect-run", run_id, "--min-sequence", "5"])
        err = capsys.readouterr().err
        assert code == 1 and "rollback refused" in err and "#1" in err, err
        assert not (tmp_path / cmd).exists()


def test_format_1_bundle_verifies_but_cannot_satisfy_a_run_check(signer_copy, capsys):
    from fedrad.common.bundle import manifest_bytes

    bundle, key, pub = signer_copy
    m = json.loads((bundle / "manifest.json").read_text())
    m["format"] = "fedrad-bundle/1"
    del m["release"]
    resign(bundle, key, manifest_bytes(m))
    assert verify_bundle(bundle, pub)["format"] == "fedrad-bundle/1"
    assert main(["verify", str(bundle), "--pubkey", str(pub), "--expect-run", "1"]) == 1
    assert "carries no release" in capsys.readouterr().err


# -- no tracebacks: the real `fedrad` command (issue 12 item 6) -----------------------------------------
def _pem_public(tmp_path, name: str, private) -> str:
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / name
    path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


# An SM2 public key (openssl genpkey -algorithm SM2): a PEM this build of cryptography cannot load.
SM2_PUB = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoEcz1UBgi0DQgAEvXxpEHKDi/ANgY25AzcKRVbv2dQs
n/iRX5OPFZ/LQdVFiVmIDNlb8FjYaJZHKNxAbGXpUNZ79vUbypGGzDkCfA==
-----END PUBLIC KEY-----
"""


def test_cli_non_ed25519_public_keys_are_one_line_errors(signed, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    bundle, _key, _pub = signed
    sm2 = tmp_path / "sm2.pub"
    sm2.write_bytes(SM2_PUB)
    p256 = _pem_public(tmp_path, "p256.pub", ec.generate_private_key(ec.SECP256R1()))
    for key in (sm2, p256):
        proc = fedrad_cli("verify", bundle, "--pubkey", key)
        assert proc.returncode == 2 and str(key) in one_line_error(proc)
    proc = fedrad_cli("embed", bundle, "--pubkey", sm2, "--data", tmp_path, "--out", tmp_path / "e")
    assert proc.returncode == 2 and str(sm2) in one_line_error(proc)


def test_cli_verify_missing_bundle_exits_2(tmp_path, signed):
    proc = fedrad_cli("verify", tmp_path / "nope", "--pubkey", signed[2])
    assert proc.returncode == 2 and str(tmp_path / "nope") in one_line_error(proc)


@pytest.mark.parametrize(("body", "problem"), [
    (b'["not", "an", "object"]\n', "not an object"),
    (None, "lacks 'weights.sha256'"),
    (None, "'in_chans' is str"),
])
def test_cli_signed_but_malformed_manifests_are_refused(signer_copy, body, problem):
    from fedrad.common.bundle import manifest_bytes

    bundle, key, pub = signer_copy
    if body is None:
        m = json.loads((bundle / "manifest.json").read_text())
        if "sha256" in problem:
            del m["weights"]["sha256"]
        else:
            m["in_chans"], m["privacy"] = "1", ["nope"]
        body = manifest_bytes(m)
    resign(bundle, key, body)
    with pytest.raises(BundleVerificationError, match=problem.replace("(", r"\(")):
        verify_bundle(bundle, pub)
    proc = fedrad_cli("verify", bundle, "--pubkey", pub)
    line = one_line_error(proc)
    assert proc.returncode == 1 and str(bundle / "manifest.json") in line and problem in line


def test_cli_signed_weights_with_a_bad_header(signer_copy, tmp_path):
    bundle, key, pub = signer_copy
    good = (bundle / "weights.safetensors").read_bytes()
    set_weights(bundle, key, (10**9).to_bytes(8, "little") + good[8:200])  # header length past the end
    proc = fedrad_cli("verify", bundle, "--pubkey", pub)
    line = one_line_error(proc)
    assert proc.returncode == 1 and "weights.safetensors" in line and "safetensors" in line
    proc = fedrad_cli("embed", bundle, "--pubkey", pub, "--data", tmp_path, "--out", tmp_path / "e")
    assert proc.returncode == 1 and "weights.safetensors" in one_line_error(proc)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    proc = fedrad_cli("embed", bare, "--insecure", "--data", tmp_path, "--out", tmp_path / "e")
    assert proc.returncode == 2 and str(bare) in one_line_error(proc)


def test_cli_release_of_a_corrupt_global_safetensors(tmp_path):
    run = make_run_dir(tmp_path)
    (run / "global.safetensors").write_bytes(b"\x00" * 7)
    key, _pub = generate_keys(tmp_path / "k")
    proc = fedrad_cli("release", run, "--key", key)
    assert proc.returncode == 2 and str(run / "global.safetensors") in one_line_error(proc)
    assert not (run / "release" / "manifest.sig").exists()


def test_cli_pretrain_out_folder_is_refused_before_training(tmp_path):
    import time

    t0 = time.perf_counter()
    proc = fedrad_cli("pretrain", tmp_path / "no-such-data", "--out", tmp_path, "--steps", "1")
    line = one_line_error(proc)
    assert proc.returncode == 2 and "--out" in line and str(tmp_path) in line and "folder" in line
    assert time.perf_counter() - t0 < 60  # no data was loaded, no step taken


# -- fuzzing (issue 12): a bounded, seeded atheris run of tests/fuzz/fuzz_bundle.py -------------------------
def test_bundle_fuzz_bounded_run_finds_no_crash(tmp_path):
    """Mutated manifests (signed and not), signatures and weights: only the verifier's contract errors."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("atheris")
    harness = Path(__file__).parent / "fuzz" / "fuzz_bundle.py"
    proc = subprocess.run([sys.executable, str(harness), "-runs=3000", "-max_total_time=25", "-seed=1",
                           "-max_len=4096", f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "FUZZ_BUNDLE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr and not list(tmp_path.glob("crash-*"))


def test_model_card_names_enrolled_sites_and_their_epsilon(tmp_path):
    """Sites appear by the names the coordinator recorded (metrics.jsonl `site_names`); under dp=sample each
    site's image-level ε (its last report) is in the sites table; no node id reaches the card."""
    from fedrad.server.release import release_bundle

    run = make_run_dir(tmp_path, dp="sample")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["site_names"] = {"0": "st-marys", "2": "charite"}
        for node, record in row["sites"].items():
            record["dp_epsilon"] = 0.25 * row["round"] + int(node)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    key, pub = generate_keys(tmp_path / "k")
    text = (release_bundle(run, key, tmp_path / "b") / "MODEL_CARD.md").read_text()
    assert "| st-marys | 20 | 20 | 33.3% | 2 | 3.0000 | 0.5000 |" in text
    assert "| site 1 | 20 | 20 | 33.3% | 2 | 3.0000 | 1.5000 |" in text
    assert "| charite | 20 | 20 | 33.3% | 2 | 3.0000 | 2.5000 |" in text
    assert "Differential privacy: sample" in text
