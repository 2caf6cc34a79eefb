"""Configuration: defaults with no file, precedence, and start-up errors that name the key."""

import subprocess
import sys

import pytest

from proxy.config import ConfigError, config_from_data, load_config


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_no_file_passes_through_to_the_real_providers():
    config = load_config(env={})
    assert config.provider_for("anthropic").base_url == "https://api.anthropic.com"
    assert config.provider_for("openai").base_url == "https://api.openai.com"
    assert config.provider_for("anthropic").api_key is None
    assert config.heartbeat_interval == 15.0 and config.idle_timeout == 120.0
    assert config.commit_delay == 15.0
    assert config.max_body_bytes == 32 * 1024 * 1024
    assert config.db_path.endswith("usage.db")


def test_base_url_variables_point_the_providers_elsewhere():
    config = load_config(env={"LLM_PROXY_ANTHROPIC_BASE_URL": "http://gw.local:9000/anthropic/",
                              "LLM_PROXY_OPENAI_BASE_URL": "http://127.0.0.1:8000"})
    assert config.provider_for("anthropic").base_url == "http://gw.local:9000/anthropic"
    assert config.provider_for("openai").base_url == "http://127.0.0.1:8000"


def test_precedence_defaults_file_env_cli(tmp_path):
    path = write(tmp_path, "[stream]\nheartbeat_interval = 5\nidle_timeout = 60\n")
    config = load_config(path, env={"LLM_PROXY_IDLE_TIMEOUT": "30"},
                         overrides={"stream.connect_timeout": 3.0})
    assert config.heartbeat_interval == 5.0  # file over default
    assert config.idle_timeout == 30.0  # env over file
    assert config.connect_timeout == 3.0  # CLI over everything


def test_the_config_file_can_be_named_by_the_environment(tmp_path):
    path = write(tmp_path, "[stream]\nheartbeat_interval = 2.5\n")
    assert load_config(env={"LLM_PROXY_CONFIG": path}).heartbeat_interval == 2.5


def test_provider_tables_override_a_default_provider_and_add_new_ones(tmp_path):
    path = write(tmp_path, '[providers.anthropic]\nbase_url = "http://a.local"\napi_key_env = "MY_KEY"\n'
                           '[providers.local]\nbase_url = "http://127.0.0.1:1234"\nformat = "openai"\n')
    config = load_config(path, env={})
    assert config.provider_for("anthropic").base_url == "http://a.local"
    assert config.providers["local"].format == "openai"


def test_provider_translation_settings_have_defaults_and_can_be_set(tmp_path):
    path = write(tmp_path, '[providers.local]\nbase_url = "http://127.0.0.1:1234"\nformat = "openai"\n'
                           'max_tokens_field = "max_completion_tokens"\nreasoning_effort = true\n'
                           '[providers.anthropic]\ndefault_max_tokens = 8192\nreasoning_content = true\n')
    providers = load_config(path, env={}).providers
    local, claude, openai = providers["local"], providers["anthropic"], providers["openai"]
    assert (local.max_tokens_field, local.reasoning_effort) == ("max_completion_tokens", True)
    assert (claude.default_max_tokens, claude.reasoning_content, claude.format) == (8192, True, "anthropic")
    assert (openai.max_tokens_field, openai.reasoning_effort, openai.default_max_tokens,
            openai.reasoning_content) == ("max_tokens", False, 4096, False)


@pytest.mark.parametrize("text, needle", [
    ("[stream]\nheartbeat_interval = -1\n", "stream.heartbeat_interval"),
    ("[providers.openai]\nmax_tokens_field = \"tokens\"\n", "providers.openai.max_tokens_field"),
    ("[providers.openai]\nreasoning_effort = \"yes\"\n", "providers.openai.reasoning_effort"),
    ("[providers.anthropic]\ndefault_max_tokens = 0\n", "providers.anthropic.default_max_tokens"),
    ("[providers.anthropic]\nreasoning_content = 1\n", "providers.anthropic.reasoning_content"),
    ("[stream]\nheartbeat_interval = \"fast\"\n", "expected float"),
    ("[stream]\nheartbeet_interval = 1\n", "unknown key stream.heartbeet_interval"),
    ("[nonsense]\nx = 1\n", "unknown section"),
    ("[providers.x]\nbase_url = \"ftp://nope\"\nformat = \"openai\"\n", "providers.x.base_url"),
    ("[providers.x]\nbase_url = \"http://ok\"\nformat = \"gemini\"\n", "providers.x.format"),
    ("[prices.\"m\"]\ninput = \"cheap\"\n", "prices.m.input"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert needle in info.value.message


def test_a_bad_environment_value_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError, match="LLM_PROXY_IDLE_TIMEOUT"):
        load_config(env={"LLM_PROXY_IDLE_TIMEOUT": "soon"})


def test_a_config_file_that_does_not_exist_is_an_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/llm-proxy.toml", env={})


def test_the_example_config_loads_and_sets_every_setting_to_its_default_and_nothing_unknown():
    """deploy/config.example.toml, parsed: every table and key in it is one the proxy knows
    (proxy/config.py), and every setting is there, at its default, with its variable named."""
    import dataclasses
    import tomllib
    from pathlib import Path

    from proxy.config import SCALAR_SECTIONS, SECTIONS, SETTINGS, Provider, default_providers

    example = Path(__file__).parent.parent / "deploy" / "config.example.toml"
    load_config(str(example), env={})
    text = example.read_text()
    data = tomllib.loads(text)
    assert set(data) <= SECTIONS, f"unknown tables in config.example.toml: {sorted(set(data) - SECTIONS)}"
    for section in SCALAR_SECTIONS:
        known = {setting.attr for setting in SETTINGS if setting.key.split(".")[0] == section}
        unknown = set(data.get(section, {})) - known
        assert not unknown, f"unknown keys in [{section}] of config.example.toml: {sorted(unknown)}"
    for setting in SETTINGS:
        section, name = setting.key.split(".")
        assert name in data.get(section, {}), f"{setting.key} is not documented in config.example.toml"
        assert data[section][name] == setting.default, \
            f"{setting.key} = {data[section][name]!r} in config.example.toml, default {setting.default!r}"
        assert setting.env is None or setting.env in text, f"{setting.env} is not named in config.example.toml"
    provider_keys = {f.name for f in dataclasses.fields(Provider)} - {"name"}
    for name, provider in default_providers().items():
        table = data.get("providers", {}).get(name)
        assert table is not None, f"[providers.{name}] is not documented in config.example.toml"
        assert set(table) <= provider_keys, f"unknown keys in [providers.{name}]: {sorted(set(table) - provider_keys)}"
        assert (table["base_url"], table["format"]) == (provider.base_url, provider.format), table


def test_cli_reports_a_bad_config_and_exits_2(tmp_path):
    path = write(tmp_path, "[stream]\nidle_timeout = 0\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", path],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "stream.idle_timeout" in result.stderr and "greater than 0" in result.stderr


def test_continuation_is_on_by_default_except_for_openais_own_api(tmp_path):
    config = load_config(env={})
    assert config.provider_for("openai").continues is False  # it ignores prefills
    assert config.provider_for("anthropic").continues is True
    local = write(tmp_path, '[providers.local]\nbase_url = "http://127.0.0.1:8000"\nformat = "openai"\n')
    assert load_config(local, env={}).providers["local"].continues is True
    assert load_config(env={"LLM_PROXY_MAX_CONTINUATIONS": "0"}).max_continuations == 0


@pytest.mark.parametrize("line", ['continuation = "yes"', 'prefill_params = "x"'])
def test_bad_continuation_settings_name_the_provider(tmp_path, line):
    path = write(tmp_path, f'[providers.p]\nbase_url = "http://127.0.0.1:1"\nformat = "anthropic"\n{line}\n')
    with pytest.raises(ConfigError, match="providers.p"):
        load_config(path, env={})


def test_the_auth_mode_defaults_to_keys_once_the_proxy_holds_a_provider_key(monkeypatch):
    assert load_config(env={}).auth_mode == "open"
    keyed = config_from_data({"providers": {"openai": {"api_key_env": "K"}}}, {}, None, None)
    assert keyed.auth_mode == "keys"
    assert config_from_data({"auth": {"mode": "open"}, "providers": {"openai": {
        "api_key_env": "K"}}}, {}, None, None).auth_mode == "open"
    assert load_config(env={"LLM_PROXY_AUTH_MODE": "keys"}).auth_mode == "keys"
    with pytest.raises(ConfigError, match="auth.mode.*must be open or keys"):
        config_from_data({"auth": {"mode": "closed"}}, {}, None, None)
    with pytest.raises(ConfigError, match="reserve_output_tokens"):
        config_from_data({"auth": {"reserve_output_tokens": 0}}, {}, None, None)


def test_the_admin_token_is_read_from_its_variable_and_keys_db_sits_beside_the_usage_db(
        monkeypatch, tmp_path):
    config = load_config(env={"LLM_PROXY_DB": str(tmp_path / "usage.db")})
    monkeypatch.delenv("LLM_PROXY_ADMIN_TOKEN", raising=False)
    assert config.admin_token is None
    monkeypatch.setenv("LLM_PROXY_ADMIN_TOKEN", "  secret-token  ")
    assert config.admin_token == "secret-token"
    assert config.keys_db_path == str(tmp_path / "keys.db")


def test_the_several_hosts_example_loads(tmp_path):
    from pathlib import Path

    example = Path(__file__).parent.parent / "deploy" / "hosts.example.toml"
    config = load_config(str(example), env={"LLM_PROXY_DB": "postgresql://u:pw@db/llm"})
    assert config.auth_mode == "keys" and config.db_is_url
    assert config.spill_path == "/var/lib/llm-proxy/spill"
    assert "pw" not in config.db_label
