"""The node config is typed once (fedrad.common.node_config.NodeConfig): the site's code reads attributes, not
string keys, and a bad value names its key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedrad.common.node_config import NODE_CONFIG_KEYS, NodeConfig

ROOT = Path(__file__).parents[1]
# Modules that still read a raw key, each with its reason: the wire guard must never raise (it turns every
# failure into an error code, so it reads audit-dir without validation), and the site runtime
# (client/runtime/site_runtime.py) writes consortium-key and reads audit-dir before any ClientApp runs.
RAW_ALLOWED = {"client/app/wire_guard.py", "client/runtime/site_runtime.py"}


def test_values_are_typed_and_unset_is_the_default() -> None:
    node = NodeConfig.of({"data-dir": "/data", "threads": "3", "device": "", "source-query": "Modality=CR"})
    assert (node.data_dir, node.threads, node.device, node.cache_dir) == ("/data", 3, "auto", "")
    assert node.model_extra == {"source-query": "Modality=CR"}  # PacsOptions owns source-* keys
    assert NodeConfig.of(node.to_flower()) == node
    assert "cache-dir" not in node.to_flower()  # unset keys are not written


@pytest.mark.parametrize("config,key", [({"threads": "many"}, "threads"), ({"threads": -2}, "threads"),
                                        ({"data-dir": True}, "data-dir")])
def test_a_bad_value_names_its_key(config: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"node-config '{key}'"):
        NodeConfig.of(config)


def test_the_site_code_reads_declared_keys_only() -> None:
    raw = re.compile(r"node_config(?:\.get\(|\[)\s*\"([a-z-]+)\"")
    found = []
    for path in sorted((ROOT / "client").rglob("*.py")) + sorted((ROOT / "common").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for key in raw.findall(path.read_text()):
            assert key in NODE_CONFIG_KEYS or key.startswith("source-"), f"{rel}: undeclared node-config '{key}'"
            if rel not in RAW_ALLOWED:
                found.append(f"{rel}: '{key}'")
    assert not found, f"read NodeConfig.of(...) attributes instead: {found}"


def test_the_site_state_and_policy_read_it() -> None:
    from fedrad.client.site.policy import policy_for
    from fedrad.client.site.site_state import state_paths

    state = state_paths({"data-dir": "/data", "state-dir": "/s", "audit-dir": ""})
    assert state.root == Path("/s") and state.audit_dir == Path("/s/audit")
    assert policy_for({"policy": ""}).source == policy_for({}).source  # unset: the built-in policy
    with pytest.raises(ValueError, match="node-config 'threads'"):
        state_paths({"data-dir": "/data", "threads": "x"})


def test_one_line_finder_for_every_config_file() -> None:
    from fedrad.client.site.policy import PolicyError, parse_policy
    from fedrad.common.toml_lines import key_line
    from fedrad.deploy.run_command import config_line

    text = 'a = 1\n"b-c" = 2\n\n[training]\nmax_image_size = "big"\na = 3\n[d]\n'
    assert (key_line(text, "a"), key_line(text, "b-c"), key_line(text, "a", "training")) == (1, 2, 6)
    assert (key_line(text, None, "training"), key_line(text, "d"), key_line(text, "zzz")) == (4, 7, 0)
    assert config_line(text, "b-c") == 2  # `fedrad run -c FILE` and `fedrad node --config` use the same finder
    with pytest.raises(PolicyError, match=r"site\.toml:5: training\.max_image_size"):
        parse_policy(text.replace('a = 1\n"b-c" = 2\n', "\n\n").replace("a = 3\n[d]\n", ""), "site.toml")
