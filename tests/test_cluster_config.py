"""The cluster agent's config (cluster.config): the example, every mistake's message, and the
runtime resource records' codec."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.config import (
    EXAMPLE_CONFIG,
    Config,
    Device,
    NodeRef,
    Resource,
    Timing,
    load_config,
    new_resource,
    parse_config,
    parse_device_option,
    parse_endpoint,
    resource_from_json,
    resource_to_json,
)
from replicator.errors import EXIT_CODES, NotFound, UsageError

PATH = "/etc/pairvol/agent.toml"

MINIMAL = """\
[cluster]
name = "c1"
secret_file = "secret"

[etcd]
endpoints = ["http://127.0.0.1:2379"]

[hosts.a]
agent = "198.18.0.2"
node = "/run/a/control.sock"

[hosts.b]
agent = "198.18.0.3:7000"
node = "198.18.0.3"
"""

DB = """
[resources.db]
hosts = ["a", "b"]
groups = ["g1"]
"""


def parse(text: str) -> Config:
    return parse_config(text, PATH)


def test_the_example_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(EXAMPLE_CONFIG)
    c = load_config(str(path))
    assert c.source == str(path) and c.cluster == "lab1"
    assert c.secret_file == "/etc/pairvol/cluster.secret"
    assert c.etcd.endpoints == (
        "http://198.18.0.1:2379",
        "http://198.18.0.2:2379",
        "http://198.18.0.3:2379",
    )
    assert c.timing == Timing()
    assert c.host_names() == ["a", "b"]
    assert c.host("a").node == NodeRef(socket="/var/lib/pairvol/a/control.sock")
    assert c.host("b").node == NodeRef(address=("198.18.0.3", 10810))
    assert str(c.host("b").node) == "198.18.0.3:10810"
    db = c.resource("db")
    assert db.hosts == ("a", "b") and db.groups == ("g1",)
    assert db.devices_on("b") == {"pv0": "nbd://198.18.0.3:10809/vol1"}
    assert db.start and db.stop and db.monitor


def test_minimal_config_defaults_and_relative_secret() -> None:
    c = parse(MINIMAL)
    assert c.secret_file == "/etc/pairvol/secret"
    assert parse_config(MINIMAL, "agent.toml", base_dir="/srv").secret_file == "/srv/secret"
    assert c.timing == Timing(0.2, 1.0, 2, 1.0)
    assert c.etcd.timeout == 0.5
    assert c.host("a").agent == ("198.18.0.2", 10811)
    assert c.host("b").agent == ("198.18.0.3", 7000)
    assert c.resources == ()


def test_defaults_follow_what_is_set() -> None:
    c = parse(MINIMAL + "[timing]\nlease_ttl = 10\nheartbeat_interval = 0.5\n")
    assert c.timing.lease_renew_interval == 5.0  # half the TTL
    assert c.timing.heartbeat_timeout == 2.5  # five intervals
    c = parse(MINIMAL.replace("[etcd]", "[timing]\nlease_renew_interval = 0.4\n[etcd]"))
    assert c.etcd.timeout == 0.2  # shorter than the renewal interval


def test_lookup_of_unknown_names() -> None:
    c = parse(MINIMAL + DB)
    with pytest.raises(NotFound, match=r"no host 'x' in \[hosts\] \(known: a, b\)"):
        c.host("x")
    with pytest.raises(NotFound, match=r"no resource 'x' \(known: db\)"):
        c.resource("x")


def _swap(old: str, new: str) -> str:
    assert old in MINIMAL + DB, old
    return (MINIMAL + DB).replace(old, new, 1)


MISTAKES = [
    # (config text, the message after "config PATH: ")
    (
        _swap("[cluster]\nname", "[cluster]\nnme"),
        "cluster.nme: unknown key (known: name, secret_file)",
    ),
    (_swap('name = "c1"\n', ""), "cluster.name: is required"),
    (_swap('name = "c1"', 'name = "c 1"'), "cluster.name: cluster name 'c 1' is not valid"),
    (_swap('name = "c1"', "name = 1"), "cluster.name: must be a string, not a number"),
    (_swap('secret_file = "secret"', 'secret_file = ""'), "cluster.secret_file: must not be empty"),
    (_swap("[cluster]", "[clusterr]"), "clusterr: unknown key (known: cluster, etcd, timing"),
    (
        _swap('endpoints = ["http://127.0.0.1:2379"]', "endpoints = []"),
        "etcd.endpoints: must name at least one",
    ),
    (
        _swap('["http://127.0.0.1:2379"]', '"http://127.0.0.1:2379"'),
        "etcd.endpoints: must be an array of URLs",
    ),
    (
        _swap('["http://127.0.0.1:2379"]', '["127.0.0.1:2379"]'),
        "etcd.endpoints: etcd endpoint '127.0.0.1:2379': use http://HOST:PORT",
    ),
    (
        _swap('["http://127.0.0.1:2379"]', '["http://127.0.0.1:2379/v3"]'),
        "only scheme, host and port",
    ),
    (
        _swap('["http://127.0.0.1:2379"]', '["http://127.0.0.1:2379", "http://127.0.0.1"]'),
        "etcd.endpoints: endpoint http://127.0.0.1:2379 is listed twice",
    ),
    (
        _swap("[etcd]\n", "[etcd]\ntimeout = 0\n"),
        "etcd.timeout: must be more than 0 seconds, not 0",
    ),
    (
        _swap("[etcd]\n", "[etcd]\ntimeout = true\n"),
        "etcd.timeout: must be a number of seconds, not a boolean",
    ),
    (
        _swap("[etcd]\n", "[etcd]\ntimeout = 1.0\n"),
        "etcd.timeout: 1s is not shorter than the lease renewal interval (1s)",
    ),
    (
        _swap("[etcd]\n", "[timing]\nlease_ttl = 2.5\n[etcd]\n"),
        "timing.lease_ttl: must be a whole number of seconds",
    ),
    (
        _swap("[etcd]\n", "[timing]\nlease_ttl = 0\n[etcd]\n"),
        "timing.lease_ttl: must be at least 1 second, not 0",
    ),
    (
        _swap("[etcd]\n", "[timing]\nlease_renew_interval = 1.5\n[etcd]\n"),
        "timing.lease_renew_interval: 1.5s is more than half the lease TTL (2s)",
    ),
    (
        _swap("[etcd]\n", "[timing]\nheartbeat_timeout = 0.3\n[etcd]\n"),
        "timing.heartbeat_timeout: 0.3s is less than two heartbeat intervals (0.4s)",
    ),
    (
        _swap("[etcd]\n", "[timing]\nhearbeat_interval = 0.1\n[etcd]\n"),
        "timing.hearbeat_interval: unknown key (known: heartbeat_interval,",
    ),
    (
        _swap("[etcd]\n", "[timing]\nheartbeat_interval = -1\n[etcd]\n"),
        "timing.heartbeat_interval: must be more than 0 seconds, not -1",
    ),
    (
        _swap("[etcd]\n", "[timing]\nheartbeat_interval = nan\n[etcd]\n"),
        "timing.heartbeat_interval: must be more than 0 seconds, not nan",
    ),
    (_swap("[hosts.a]", '[hosts."a b"]'), "hosts.\"a b\": host name 'a b' is not valid"),
    (
        _swap('agent = "198.18.0.2"', 'agent = "a.example"'),
        "hosts.a.agent: 'a.example' is not an IP address",
    ),
    (
        _swap('agent = "198.18.0.2"', 'agent = "198.18.0.2:0"'),
        "hosts.a.agent: '198.18.0.2:0': '0' is not a TCP port",
    ),
    (
        _swap('agent = "198.18.0.2"', 'agent = "198.18.0.3:7000"'),
        "hosts.b.agent: address 198.18.0.3:7000 is already host 'a''s",
    ),
    (_swap('agent = "198.18.0.2"\n', ""), "hosts.a.agent: is required"),
    (
        _swap('node = "/run/a/control.sock"', 'node = "run/a.sock"'),
        "hosts.a.node: 'run/a.sock' is neither the node's control socket",
    ),
    (
        _swap('node = "/run/a/control.sock"', "nod = 1"),
        "hosts.a.nod: unknown key (known: agent, node)",
    ),
    (_swap("[hosts.a]\n", "[hosts.a]\nagent2 = 1\n"), "hosts.a.agent2: unknown key"),
    (
        _swap('hosts = ["a", "b"]', 'hosts = ["a", "c"]'),
        "resources.db.hosts: host 'c' is not defined in [hosts]",
    ),
    (
        _swap('hosts = ["a", "b"]', 'hosts = ["a", "a"]'),
        "resources.db.hosts: host 'a' is listed twice",
    ),
    (_swap('hosts = ["a", "b"]', "hosts = []"), "resources.db.hosts: must name at least one host"),
    (
        _swap('hosts = ["a", "b"]', 'hosts = "a"'),
        "resources.db.hosts: must be an array of hosts, not a string",
    ),
    (_swap('hosts = ["a", "b"]', "hosts = [1]"), "resources.db.hosts: host 1 is not a string"),
    (
        _swap('groups = ["g1"]', 'groups = ["g/1"]'),
        "resources.db.groups: group name 'g/1' contains '/'",
    ),
    (_swap('groups = ["g1"]\n', ""), "resources.db.groups: is required"),
    (_swap("[resources.db]", '[resources.".db"]'), "resource name '.db' is not valid"),
    (
        _swap('groups = ["g1"]', 'groups = ["g1"]\nstrat = "x"'),
        "resources.db.strat: unknown key (known: hosts, groups, devices, start, stop, monitor)",
    ),
    (
        _swap('groups = ["g1"]', 'groups = ["g1"]\nstart = ""'),
        "resources.db.start: must not be empty",
    ),
    (
        _swap('groups = ["g1"]', 'groups = ["g1"]\nstop = ["x"]'),
        "resources.db.stop: must be a string, not an array",
    ),
    (
        MINIMAL + DB + '[resources.db2]\nhosts = ["a"]\ngroups = ["g2", "g1"]\n',
        "resources.db2.groups: group 'g1' is already owned by resource 'db'",
    ),
    (
        MINIMAL + DB + '[resources.db.devices.c]\npv0 = "nbd://1.2.3.4/v"\n',
        "resources.db.devices.c: host 'c' is not one of the resource's hosts",
    ),
    (
        MINIMAL + DB + '[resources.db.devices.a]\n"pv 0" = "nbd://1.2.3.4/v"\n',
        "resources.db.devices.a.\"pv 0\": device name 'pv 0' is not valid",
    ),
    (
        MINIMAL + DB + '[resources.db.devices.a]\npv0 = "http://1.2.3.4/v"\n',
        "resources.db.devices.a.pv0: NBD URI 'http://1.2.3.4/v': scheme must be nbd://",
    ),
    (
        MINIMAL + DB + '[resources.db.devices.a]\npv0 = "nbd://1.2.3.4"\n',
        "resources.db.devices.a.pv0: 'nbd://1.2.3.4' names no export",
    ),
    (
        MINIMAL + DB + '[resources.db.devices.a]\npv0 = "nbd://1.2.3.4/v@00c5247772d2f36b"\n',
        "carries a PVID: name the export alone",
    ),
    (
        MINIMAL
        + DB
        + '[resources.db.devices.a]\npv0 = "nbd://1.2.3.4/v"\npv1 = "nbd://1.2.3.4:10809/v"\n',
        "resources.db.devices.a.pv1: export nbd://1.2.3.4:10809/v is already device 'pv0'",
    ),
    (
        MINIMAL + DB + "[resources.db.devices]\na = 1\n",
        "resources.db.devices.a: must be a table, not a number",
    ),
    (MINIMAL.replace("[hosts.a]", "[hostz]\n[hosts.a]"), "hostz: unknown key"),
    (MINIMAL.split("[hosts.a]")[0] + "[hosts]\n", "hosts: must define at least one host"),
    (MINIMAL.split("[hosts.a]")[0], "hosts: is required"),
    (
        "etcd = 3\n" + MINIMAL.replace('[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n', ""),
        "etcd: must be a table, not a number",
    ),
]


@pytest.mark.parametrize(("text", "message"), MISTAKES)
def test_each_mistake_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(text)
    text_of = str(info.value)
    assert text_of.startswith(f"config {PATH}: "), text_of
    assert message in text_of, text_of
    assert "\n" not in text_of
    assert info.value.exit_code == EXIT_CODES["usage"] == 2


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[cluster]\nname = "c1"\nsecret_file = \n', "line 3, column 15"),
        ('[cluster]\nname = "c1"\n[cluster]\n', "line 3, column 9"),
        ('[cluster]\nname = "c1', "line 2, at the end of the file"),
    ],
)
def test_toml_syntax_error_names_the_line(text: str, where: str) -> None:
    with pytest.raises(UsageError, match=rf"^config {PATH}: {where}: invalid TOML: "):
        parse(text)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"config .*/nope.toml does not exist"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(UsageError, match="is a directory"):
        load_config(str(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[cluster]\n\nname = '\xff'\n")
    with pytest.raises(UsageError, match=r"bad.toml: line 3: not UTF-8 text"):
        load_config(str(bad))


def test_parse_endpoint() -> None:
    assert parse_endpoint("http://127.0.0.1") == "http://127.0.0.1:2379"
    assert parse_endpoint("https://etcd.example:2400/") == "https://etcd.example:2400"
    assert parse_endpoint("http://[::1]:2379") == "http://[::1]:2379"
    for bad in ["etcd:2379", "http://", "http://u@h:1", "http://h:99999", "http://h:1?x=1"]:
        with pytest.raises(UsageError, match="etcd endpoint"):
            parse_endpoint(bad)


# -- runtime resource records ---------------------------------------------------------------

DB_RESOURCE = Resource(
    name="db",
    hosts=("a", "b"),
    groups=("g1", "g2"),
    devices=(
        Device("a", "pv0", "nbd://198.18.0.2:10809/vol1"),
        Device("b", "pv0", "nbd+unix:///vol1?socket=/run/b/nbd.sock"),
    ),
    start="mount /srv",
)


def test_resource_record_round_trip() -> None:
    data = resource_to_json(DB_RESOURCE)
    assert json.loads(data) == {
        "version": 1,
        "name": "db",
        "hosts": ["a", "b"],
        "groups": ["g1", "g2"],
        "devices": {
            "a": {"pv0": "nbd://198.18.0.2:10809/vol1"},
            "b": {"pv0": "nbd+unix:///vol1?socket=/run/b/nbd.sock"},
        },
        "start": "mount /srv",
        "stop": None,
        "monitor": None,
    }
    assert resource_from_json(data) == DB_RESOURCE
    assert resource_from_json(data.decode(), name="db", known_hosts=["a", "b", "c"]) == DB_RESOURCE


def _record(**change: object) -> bytes:
    doc = json.loads(resource_to_json(DB_RESOURCE))
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        (b"{", {}, "resource record: not JSON"),
        (b"[]", {}, "resource record: must be a table, not an array"),
        (_record(version=2), {}, "resource record: version: version 2 is not 1"),
        (_record(version="1"), {}, "resource record: version: must be an integer, not a string"),
        (
            _record(name="db2"),
            {"name": "db"},
            "resource record db: name: the record is stored as 'db' but names 'db2'",
        ),
        (
            _record(hosts=["a", "c"]),
            {"known_hosts": ["a", "b"]},
            "resource record db: hosts: host 'c' is not defined in [hosts]",
        ),
        (_record(hosts=[]), {}, "resource record db: hosts: must name at least one host"),
        (_record(groups=["a b"]), {}, "resource record db: groups: group name 'a b' contains ' '"),
        (_record(devices={"c": {}}), {}, "resource record db: devices.c: host 'c' is not one of"),
        (_record(extra=1), {}, "resource record: extra: unknown key"),
        (_record(start=5), {}, "resource record db: start: must be a string, not a number"),
    ],
)
def test_bad_resource_records(data: bytes, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as info:
        resource_from_json(data, **kwargs)  # type: ignore[arg-type]
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_usage_error(data: bytes) -> None:
    with contextlib.suppress(UsageError):  # the one error it may raise; anything else fails
        resource_from_json(data)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {"version": st.just(1), "name": st.sampled_from(["db", "x y"])},
        optional={k: _json for k in ["hosts", "groups", "devices", "start", "stop", "monitor"]},
    )
)
def test_any_record_shape_decodes_or_raises_usage_error(doc: dict[str, object]) -> None:
    try:
        r = resource_from_json(json.dumps(doc))
    except UsageError:
        return
    assert resource_from_json(resource_to_json(r)) == r


def test_new_resource_from_the_cli_options() -> None:
    r = new_resource(
        "db",
        hosts=["a", "b"],
        groups=["g1"],
        devices=["pv0=nbd://198.18.0.9/vol1", "b:pv1=nbd://198.18.0.3/vol2"],
        stop="umount /srv",
        known_hosts=["a", "b"],
    )
    assert r.devices_on("a") == {"pv0": "nbd://198.18.0.9:10809/vol1"}
    assert r.devices_on("b") == {
        "pv0": "nbd://198.18.0.9:10809/vol1",
        "pv1": "nbd://198.18.0.3:10809/vol2",
    }
    assert r.stop == "umount /srv" and r.start is None
    assert resource_from_json(resource_to_json(r), name="db") == r


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"devices": ["pv0"]}, "--device 'pv0': expected NAME=EXPORT or HOST:NAME=EXPORT"),
        (
            {"devices": ["c:pv0=nbd://1.2.3.4/v"]},
            "--device 'c:pv0=nbd://1.2.3.4/v': host 'c' is not in --hosts",
        ),
        (
            {"devices": ["pv0=nbd://1.2.3.4/v", "a:pv0=nbd://1.2.3.4/w"]},
            "device 'pv0' is given twice on a",
        ),
        ({"devices": ["pv0=vol1"]}, "resource db: devices.a.pv0: NBD URI 'vol1'"),
        (
            {"hosts": ["a", "z"], "known_hosts": ["a"]},
            "resource db: hosts: host 'z' is not defined",
        ),
        ({"groups": []}, "resource db: groups: must name at least one group"),
        ({"start": " "}, "resource db: start: must not be empty"),
    ],
)
def test_new_resource_mistakes(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"hosts": ["a", "b"], "groups": ["g1"], **kwargs}
    with pytest.raises(UsageError) as info:
        new_resource("db", **args)  # type: ignore[arg-type]
    assert message in str(info.value), str(info.value)


def test_parse_device_option() -> None:
    assert parse_device_option("pv0=nbd://h/v", ["a", "b"]) == [
        ("a", "pv0", "nbd://h/v"),
        ("b", "pv0", "nbd://h/v"),
    ]
    assert parse_device_option("b:pv0=nbd://h/v=x", ["a", "b"]) == [("b", "pv0", "nbd://h/v=x")]
