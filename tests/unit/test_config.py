"""hostagent.config: defaults, TOML loading, errors that name the dotted key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hostagent import config as config_module
from hostagent.config import Config, load_config, parse_listen, read_secret
from hostagent.errors import ConfigError


@pytest.fixture
def no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point DEFAULT_CONFIG_PATH at a file that does not exist, whatever this machine has."""
    missing = tmp_path / "etc" / "hostagent.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", missing)
    return missing


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostagent.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    return str(exc.value)


# --- defaults ---------------------------------------------------------------------------------


def test_no_file_means_defaults(no_default_file: Path) -> None:
    assert not no_default_file.exists()
    config = load_config(None)
    assert config == Config()
    assert config.host_id == socket.gethostname()
    assert config.api.listen == "127.0.0.1:8470"
    assert (config.api.host, config.api.port) == ("127.0.0.1", 8470)
    assert config.state_dir == Path("/var/lib/hostagent")
    assert config.libvirt.domain_type == "auto"
    assert config.libvirt.uri == "qemu:///system"
    assert config.capacity.reserved_memory_mib == 1024
    assert config.capacity.vcpu_ratio == 4.0
    assert config.reconciler.concurrency == 8


def test_none_reads_the_default_file_when_it_exists(no_default_file: Path, tmp_path: Path) -> None:
    no_default_file.parent.mkdir()
    no_default_file.write_text('host_id = "from-etc"\n')
    assert load_config(None).host_id == "from-etc"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_derived_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'state_dir = "{tmp_path}/state"\n'))
    assert config.database == tmp_path / "state" / "state.db"
    assert config.token_file == tmp_path / "state" / "api-token"
    assert config.nodes_dir == tmp_path / "state" / "nodes"
    assert config.images == tmp_path / "state" / "images"


def test_image_dir_overrides_images(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'image_dir = "{tmp_path}/img"\n'))
    assert config.images == tmp_path / "img"
    assert config.pulled_images == tmp_path / "img" / ".pulled"


def test_pulled_dir_is_the_agents_own(tmp_path: Path) -> None:
    text = f'image_dir = "{tmp_path}/shared"\npulled_dir = "{tmp_path}/h1/pulled"\n'
    config = load_config(write(tmp_path, text))
    assert config.images == tmp_path / "shared"
    assert config.pulled_images == tmp_path / "h1" / "pulled"


def test_explicit_values_are_loaded(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
host_id = "h7"
[api]
listen = "[::1]:9000"
[libvirt]
domain_type = "qemu"
[capacity]
reserved_memory_mib = 0
vcpu_ratio = 1.5
[reconciler]
concurrency = 1
""",
        )
    )
    assert config.host_id == "h7"
    assert (config.api.host, config.api.port) == ("::1", 9000)
    assert config.libvirt.domain_type == "qemu"
    assert config.capacity.reserved_memory_mib == 0
    assert config.capacity.vcpu_ratio == 1.5
    assert config.reconciler.concurrency == 1


# --- errors name the dotted key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[capacity]\nreserved_memory_mib = -1\n", "capacity.reserved_memory_mib"),
        ('[capacity]\nreserved_memory_mib = "lots"\n', "capacity.reserved_memory_mib"),
        ("[capacity]\nvcpu_ratio = 0\n", "capacity.vcpu_ratio"),
        ("[capacity]\nvcpu_ratio = 17\n", "capacity.vcpu_ratio"),
        ('[libvirt]\ndomain_type = "xen"\n', "libvirt.domain_type"),
        ("[libvirt]\nkvm_probe_timeout_s = 0\n", "libvirt.kvm_probe_timeout_s"),
        ('[api]\nlisen = "127.0.0.1:8470"\n', "api.lisen"),
        ('[api]\nlisten = "localhost:8470"\n', "api.listen"),
        ('[api]\nlisten = "127.0.0.1"\n', "api.listen"),
        ('[api]\nlisten = "127.0.0.1:0"\n', "api.listen"),
        ('[api]\nlisten = "127.0.0.1:65536"\n', "api.listen"),
        ("[phone_home]\nport = 0\n", "phone_home.port"),
        ("[reconciler]\nconcurrency = 0\n", "reconciler.concurrency"),
        ("[reconciler]\nconcurrency = 65\n", "reconciler.concurrency"),
        ('unknown_top_level = "x"\n', "unknown_top_level"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection"),
        ("api = 5\n", "api"),
    ],
)
def test_invalid_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert f"{key}:" in message


def test_every_bad_key_is_reported(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, '[capacity]\nreserved_vcpus = -1\n[libvirt]\ndomain_type = "xen"\n'
    )
    assert "capacity.reserved_vcpus" in message
    assert "libvirt.domain_type" in message


def test_bad_toml_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, "[api\nlisten = \n")
    with pytest.raises(ConfigError, match="is not valid TOML") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read configuration") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file even by root, unlike a chmod 000 file.
    path = tmp_path / "dir.toml"
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot read configuration") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    """TOML is UTF-8; a stray Latin-1 byte is a configuration error, not a crash."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('host_id = "h\xf6st"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)


# --- TLS for non-loopback listen addresses ----------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:8470", "192.0.2.1:8470", "[::]:8470"])
def test_non_loopback_without_tls_is_refused(tmp_path: Path, listen: str) -> None:
    message = config_error(tmp_path, f'[api]\nlisten = "{listen}"\n')
    assert message.startswith("api.listen:")
    assert "tls" in message


def test_non_loopback_with_only_a_certificate_is_refused(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, '[api]\nlisten = "0.0.0.0:8470"\ntls_cert = "/etc/hostagent/tls.crt"\n'
    )
    assert message.startswith("api.listen:")


def test_non_loopback_with_tls_is_accepted(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[api]\nlisten = "0.0.0.0:8470"\n'
            'tls_cert = "/etc/hostagent/tls.crt"\ntls_key = "/etc/hostagent/tls.key"\n',
        )
    )
    assert config.api.host == "0.0.0.0"
    assert config.api.tls_key == Path("/etc/hostagent/tls.key")


def test_a_client_ca_needs_tls(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[api]\nclient_ca_file = "/etc/hostagent/zone-ca.pem"\n')
    assert message.startswith("api.client_ca_file:") and "tls_cert" in message


def test_mutual_tls_with_the_zone_is_on_for_an_https_zone(tmp_path: Path) -> None:
    zone = '[zone]\nurl = "{}"\ntoken_file = "/etc/t"\napi_url = "https://192.0.2.1:8470"\n'
    assert load_config(write(tmp_path, zone.format("https://192.0.2.9:8471"))).zone_mtls
    assert not load_config(write(tmp_path, zone.format("http://127.0.0.1:8471"))).zone_mtls
    assert not load_config(write(tmp_path, "")).zone_mtls


@pytest.mark.parametrize("listen", ["127.0.0.1:8470", "127.1.2.3:1", "[::1]:65535"])
def test_loopback_needs_no_tls(tmp_path: Path, listen: str) -> None:
    assert load_config(write(tmp_path, f'[api]\nlisten = "{listen}"\n')).api.listen == listen


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:8470", ("127.0.0.1", 8470)), ("[::1]:1", ("::1", 1))],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["", ":8470", "127.0.0.1:", "127.0.0.1:x", "host:80"])
def test_parse_listen_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


# --- [zone] -----------------------------------------------------------------------------------

ZONE = '[zone]\nurl = "{url}"\ntoken_file = "/etc/hostagent/zone-token"\n'


def test_no_zone_means_standalone(no_default_file: Path) -> None:
    config = load_config(None)
    assert config.zone.url is None
    assert config.zone.failure_domain == "default"
    assert config.pki.backend == "local"


def test_zone_section_is_loaded(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[zone]\nurl = "https://10.250.0.1:8471/"\ntoken_file = "/etc/t"\n'
            'ca_file = "/etc/ca.pem"\nfailure_domain = "rack-1"\n'
            'api_url = "https://10.250.0.11:8470"\n[pki]\nbackend = "zone"\n',
        )
    )
    assert config.zone.url == "https://10.250.0.1:8471"  # the trailing / is dropped
    assert config.zone.token_file == Path("/etc/t")
    assert config.zone.ca_file == Path("/etc/ca.pem")
    assert config.zone.failure_domain == "rack-1"
    assert config.agent_url == "https://10.250.0.11:8470"
    assert config.pki.backend == "zone"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "http://127.0.0.1:8470"),
        ('[api]\nlisten = "127.0.0.2:9000"\n', "http://127.0.0.2:9000"),
        ('[api]\nlisten = "[::1]:9000"\n', "http://[::1]:9000"),
        (
            '[api]\nlisten = "10.250.0.11:8470"\ntls_cert = "/c"\ntls_key = "/k"\n',
            "https://10.250.0.11:8470",
        ),
        (
            '[api]\nlisten = "0.0.0.0:8470"\ntls_cert = "/c"\ntls_key = "/k"\n'
            '[network]\nunderlay_address = "10.250.0.11"\n',
            "https://10.250.0.11:8470",
        ),
    ],
)
def test_api_url_defaults_from_the_listen_address(
    tmp_path: Path, extra: str, expected: str
) -> None:
    config = load_config(write(tmp_path, ZONE.format(url="http://127.0.0.1:8471") + extra))
    assert config.agent_url == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (ZONE.format(url="ftp://10.0.0.1:8471"), "http:// or https://"),
        (ZONE.format(url="https://"), "with a host"),
        (ZONE.format(url="https://10.0.0.1:99999"), "not a URL"),
        (ZONE.format(url="https://u:p@10.0.0.1:8471"), "credentials"),
        (ZONE.format(url="http://10.250.0.1:8471"), "loopback"),
        (ZONE.format(url="http://zone.example:8471"), "loopback"),
        ('[zone]\nurl = "https://10.250.0.1:8471"\n', "token_file"),
        (ZONE.format(url="https://z:1") + 'failure_domain = "rack 1"\n', "failure_domain"),
        (ZONE.format(url="https://z:1") + 'failure_domain = ""\n', "failure_domain"),
        (ZONE.format(url="https://z:1") + 'api_url = "10.0.0.1:8470"\n', "api_url"),
        (ZONE.format(url="https://z:1") + 'api_url = "http://10.0.0.1:8470"\n', "loopback"),
        (ZONE.format(url="https://z:1") + "timeout_s = 0\n", "timeout_s"),
        (ZONE.format(url="https://z:1") + "tokenfile = 1\n", "tokenfile"),
        ('[pki]\nbackend = "zone"\n', "needs [zone] url"),
        (
            ZONE.format(url="https://z:1") + '[api]\nlisten = "0.0.0.0:8470"\n'
            'tls_cert = "/c"\ntls_key = "/k"\n',
            "zone.api_url",
        ),
    ],
)
def test_bad_zone_settings_are_refused(tmp_path: Path, text: str, words: str) -> None:
    message = config_error(tmp_path, text)
    assert words in message
    assert message.startswith("invalid configuration: ")
    assert ": :" not in message  # a check of the whole file names its key itself


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8471", "http://localhost:8471", "http://[::1]:8471", "https://z:1"]
)
def test_plain_http_to_loopback_is_allowed(tmp_path: Path, url: str) -> None:
    assert load_config(write(tmp_path, ZONE.format(url=url))).zone.url == url


def test_read_secret(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  abc\n")
    assert read_secret(token, "zone.token_file") == "abc"
    token.write_text("\n")
    with pytest.raises(ConfigError, match=r"zone\.token_file: .* is empty"):
        read_secret(token, "zone.token_file")
    with pytest.raises(ConfigError, match=r"zone\.token_file: cannot read"):
        read_secret(tmp_path / "missing", "zone.token_file")


def test_a_zone_needs_a_dns_label_host_id(tmp_path: Path) -> None:
    path = tmp_path / "hostagent.toml"
    path.write_text(
        'host_id = "Host_A.example"\n[zone]\nurl = "http://127.0.0.1:8471"\n'
        f'token_file = "{tmp_path / "token"}"\n'
    )
    with pytest.raises(ConfigError, match="DNS-1123 label"):
        load_config(path)
