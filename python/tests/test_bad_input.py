"""Bad input gets a typed exception naming the value, and nothing stays registered."""

import numpy as np
import pytest
import torch

import kvferry
import kvpeers


@pytest.fixture
def agent():
    with kvferry.Agent("bad-input", secret=kvpeers.SECRET) as a:
        yield a


def _nothing_registered(agent, name="kv"):
    assert agent.stats()["registered_bytes"] == 0
    assert agent.stats()["live"]["pool"] == 0
    with pytest.raises(kvferry.NotFoundError, match=name):
        agent.pool(name)


def test_non_contiguous_tensor_is_refused_naming_it(agent):
    kv = kvpeers.kv_tensors(seed=3)
    kv[3] = kv[3].transpose(1, 2)  # layer 1, V: a view, not contiguous
    with pytest.raises(kvferry.InvalidArgumentError, match=r"regions\[3\] \(layer 1 plane V\).*not contiguous"):
        agent.register_pool("kv", kvpeers.layout(), kv)
    _nothing_registered(agent)


def test_wrong_dtype_is_refused_naming_it(agent):
    kv = kvpeers.kv_tensors(seed=3)
    kv[0] = torch.zeros(kvpeers.SHAPE, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"regions\[0\].*torch.float32 has 4-byte elements.*element_bytes=2"):
        agent.register_pool("kv", kvpeers.layout(), kv)
    _nothing_registered(agent)


def test_wrong_device_is_refused_naming_it(agent):
    kv = kvpeers.kv_tensors(seed=3)
    kv[5] = torch.empty(kvpeers.SHAPE, dtype=torch.float16, device="meta")
    with pytest.raises(kvferry.InvalidArgumentError, match=r"regions\[5\].*device 'meta'"):
        agent.register_pool("kv", kvpeers.layout(), kv)
    _nothing_registered(agent)


def test_wrong_length_and_count_are_refused(agent):
    kv = kvpeers.kv_tensors(seed=3)
    kv[2] = torch.zeros((kvpeers.BLOCKS - 1,) + kvpeers.SHAPE[1:], dtype=torch.float16)
    with pytest.raises(kvferry.InvalidArgumentError, match=r"regions\[2\].*bytes, but the layout puts"):
        agent.register_pool("kv", kvpeers.layout(), kv)
    with pytest.raises(kvferry.InvalidArgumentError, match=r"5 regions"):
        agent.register_pool("kv", kvpeers.layout(), kvpeers.kv_tensors(seed=3)[:5])
    with pytest.raises(kvferry.InvalidArgumentError, match=r"regions\[0\].*str"):
        agent.register_pool("kv", kvpeers.layout(), ["not memory"])
    _nothing_registered(agent)


def test_numpy_arrays_register_and_bad_ones_do_not(agent):
    arr = np.zeros(kvpeers.layout().total_bytes // 2, dtype=np.float16)
    with pytest.raises(kvferry.InvalidArgumentError, match=r"not C-contiguous"):
        agent.register_pool("kv", kvpeers.layout(), [arr.reshape(2, -1).T])
    _nothing_registered(agent)
    # numpy aligns to 16 bytes; kvferry wants 64 (the library names the base).
    raw = np.zeros(arr.nbytes + 128, dtype=np.uint8)
    skew = (-raw.ctypes.data) % 64
    with pytest.raises(kvferry.InvalidArgumentError, match="not aligned to 64"):
        agent.register_pool("kv", kvpeers.layout(), [raw[skew + 2:skew + 2 + arr.nbytes].view(np.float16)])
    _nothing_registered(agent)
    arr = raw[skew:skew + arr.nbytes].view(np.float16)
    pool = agent.register_pool("kv", kvpeers.layout(), [arr])
    assert pool.memory_source == "engine-owned"
    assert agent.stats()["registered_bytes"] == arr.nbytes


def test_bad_layout_from_the_library_names_the_field(agent):
    bad = kvferry.KvLayout(num_layers=0, num_blocks=4, tokens_per_block=16, num_kv_heads=1,
                           head_dim=32, element_bytes=2)
    with pytest.raises(kvferry.InvalidArgumentError, match="num_layers"):
        agent.create_pool("kv", bad)
    _nothing_registered(agent)


def test_out_of_range_block_ids(agent):
    pool = agent.register_pool("kv", kvpeers.layout(), kvpeers.kv_tensors(seed=3))
    with pytest.raises(kvferry.InvalidArgumentError, match=str(kvpeers.BLOCKS)):
        pool.lease_ids([1, kvpeers.BLOCKS])
    with pytest.raises(kvferry.InvalidArgumentError, match="-1"):
        pool.lease_ids([-1])
    assert pool.free_blocks == kvpeers.BLOCKS  # all or nothing

    # A remote id past the peer's pool: kOutOfRange (an IndexError) naming it.
    with kvferry.Agent("peer", secret=kvpeers.SECRET) as peer:
        peer.register_pool("kv", kvpeers.layout(), kvpeers.kv_tensors(seed=4))
        agent.connect("127.0.0.1", peer.listen())
        with pool.lease_ids([0, 1]) as blocks:
            with pytest.raises(IndexError, match=str(kvpeers.BLOCKS + 5)):
                agent.read("peer", blocks, [0, kvpeers.BLOCKS + 5])
        assert agent.stats()["live"]["transfer"] == 0
    assert pool.free_blocks == kvpeers.BLOCKS


def test_wrong_secret_is_refused(agent):
    with kvferry.Agent("intruder", secret="not-the-secret") as intruder:
        port = agent.listen()
        with pytest.raises(kvferry.UnauthenticatedError, match="127.0.0.1"):
            intruder.connect("127.0.0.1", port, timeout=30)
        assert intruder.peers == [] or all(p.state != "connected" for p in intruder.peers)


def test_released_blockset_and_closed_agent(agent):
    pool = agent.create_pool("kv", kvpeers.layout())
    blocks = pool.lease(2)
    blocks.release()
    with pytest.raises(kvferry.InvalidArgumentError, match="released"):
        agent.read("nobody", blocks, [0, 1])
    agent.close()
    with pytest.raises(kvferry.FailedPreconditionError, match="closed"):
        agent.listen()
    with pytest.raises(kvferry.FailedPreconditionError, match="closed"):
        pool.lease(1)


def test_unknown_peer_is_not_found(agent):
    pool = agent.create_pool("kv", kvpeers.layout())
    with pool.lease(1) as blocks:
        with pytest.raises(LookupError, match="nobody"):
            agent.read("nobody", blocks, [0])
