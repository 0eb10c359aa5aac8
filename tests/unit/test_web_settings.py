"""The ``[http]`` section, the counters the web side reads, and the histogram bucket arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from parent_partition.config import Config, ConfigError, tables_help
from parent_partition.counters import LATENCY_BUCKETS, LatencyHistogram, Sample, counters_json
from parent_partition.web.settings import http_address, is_loopback, split_address


@pytest.mark.parametrize("text", ["127.0.0.1:8080", "[::1]:0", "0.0.0.0:9000", "localhost:80", "none"])
def test_good_http_addresses(text: str) -> None:
    assert http_address(text) == text


@pytest.mark.parametrize(("text", "needle"), [("localhost", "no port"), ("127.0.0.1:99999", "not a number"),
                                              ("http://127.0.0.1:80", "must be HOST:PORT"), (8080, "not 8080"),
                                              (":80", "no host")])
def test_bad_http_addresses_say_what_is_wrong(text: object, needle: str) -> None:
    with pytest.raises(ValueError, match="must be HOST:PORT") as err:
        http_address(text)
    assert needle in str(err.value), str(err.value)


def test_loopback_and_split() -> None:
    assert split_address("[::1]:8080") == ("::1", 8080)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_http_section_from_a_config_file(tmp_path: Path) -> None:
    assert not Config().http.explicit and Config().http.listen == "127.0.0.1:8080"
    path = tmp_path / "p.toml"
    path.write_text('[http]\nlisten = "127.0.0.1:0"\npartition_labels = true\n')
    cfg = Config.load(str(path))
    assert cfg.http.listen == "127.0.0.1:0" and cfg.http.partition_labels and cfg.http.explicit
    path.write_text("[http]\npartition_labels = true\n")
    assert not Config.load(str(path)).http.explicit
    path.write_text('[http]\nport = 80\n')
    with pytest.raises(ConfigError, match=r"\[http\] port: unknown setting; known: listen, partition_labels, "
                                          r"token_file, tls_cert_file, tls_key_file, tls_client_ca_file"):
        Config.load(str(path))
    path.write_text('[http]\nlisten = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"\[http\] listen: must be HOST:PORT"):
        Config.load(str(path))
    assert ("[http] (listen, partition_labels, token_file, tls_cert_file, tls_key_file, tls_client_ca_file)"
            in tables_help())


def test_histogram_buckets_are_cumulative_with_microsecond_bounds() -> None:
    h = LatencyHistogram()
    for seconds in (3e-6, 5e-6, 7e-6, 0.002, 60.0):
        h.observe(seconds)
    buckets = dict(h.cumulative())
    assert LATENCY_BUCKETS[0] == 5e-6
    assert buckets["5e-06"] == 2 and buckets["1e-05"] == 3 and buckets["0.0025"] == 4, buckets
    assert buckets["10.0"] == 4 and buckets["+Inf"] == 5 == h.count
    assert h.sum == pytest.approx(60.002015)


def test_device_counters_sum_over_partitions_in_json() -> None:
    samples = [Sample("requests_total", 3, "h", partition="a"), Sample("requests_total", 4, "h", partition="b"),
               Sample("drops_total", 1, "h", labels=(("reason", "runt"),)), Sample("open", 2, "h", "gauge")]
    out = counters_json(samples)
    assert out["totals"] == {"requests_total": 7, "drops_total{reason=runt}": 1, "open": 2}
    assert out["partitions"] == {"a": {"requests_total": 3}, "b": {"requests_total": 4}}


def test_auth_tables_are_listed_in_the_help() -> None:
    assert "[auth] (mode, replace), [[auth.partition]] (name, secret_file)" in tables_help()
