from simplerpc_mp import RemoteError
import pytest


def test_echo_roundtrip(basic_server):
    with basic_server.client() as client:
        assert client.call("echo", {"a": [1, 2, {"b": None}]}) == {"a": [1, 2, {"b": None}]}
        with pytest.raises(RemoteError) as info:
            client.call("nope", {})
        assert info.value.reason == "UnknownOpcode"
    assert len(basic_server.workers()) == 2
