"""Sharded forward on fake CPU meshes equals one device; the rules table and meshes refuse nonsense."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import qwen2_jax
from hf_utils import hf_dense_config, make_hf_model
from qwen2_jax.sharding import LOGICAL_RULES, ShardingError, logical_to_spec, make_mesh, validate_rules
from tolerances import SHARDED_REL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 4 q heads / 2 kv heads: on tensor=4 the kv heads cannot split and must stay replicated
    hf_cfg = hf_dense_config(
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=1,
    )
    model = make_hf_model(hf_cfg, seed=11)
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, max_shard_size="50KB")
    return str(path)


@pytest.mark.parametrize(
    "axes", [dict(fsdp=2, tensor=4), dict(data=2, fsdp=4), dict(tensor=2), dict(data=2, expert=2, tensor=2)]
)
def test_sharded_logits_equal_one_device(checkpoint, axes):
    n = int(np.prod(list(axes.values())))
    mesh = make_mesh(**axes, devices=jax.devices()[:n])
    config, single = qwen2_jax.load_checkpoint(checkpoint)
    _, sharded = qwen2_jax.load_checkpoint(checkpoint, mesh=mesh)
    # parameters really are distributed the way the rules say
    q = sharded["layers"]["self_attn"]["q_kernel"]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.mesh == mesh
    expected = PartitionSpec(
        None, "fsdp" if axes.get("fsdp", 1) > 1 else None, "tensor" if axes.get("tensor", 1) > 1 else None, None
    )
    assert q.sharding.spec == expected
    if axes.get("tensor", 1) == 4:
        assert sharded["layers"]["self_attn"]["k_kernel"].sharding.spec[2] is None  # 2 kv heads on 4
    rng = np.random.RandomState(0)
    ids = rng.randint(0, config.vocab_size, (4, 16))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[3, -3:] = 0
    ref = np.asarray(qwen2_jax.forward(config, single, ids, mask))
    out = qwen2_jax.forward(config, sharded, ids, mask)
    assert out.sharding.mesh == mesh
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], rtol=0, atol=SHARDED_REL * np.abs(ref).max())


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    rules = LOGICAL_RULES + (("my_axis", ("tensor",)),)
    with pytest.raises(ShardingError, match="'q_heads' and 'my_axis' both map to mesh axis 'tensor'"):
        logical_to_spec(("q_heads", "my_axis"), rules)
    with pytest.raises(ShardingError, match="appears twice"):
        validate_rules((("embed", ("fsdp",)), ("embed", ("tensor",))))
    with pytest.raises(ShardingError, match="unknown mesh axes"):
        validate_rules((("embed", ("pipeline",)),))
    with pytest.raises(ShardingError, match="no rule"):
        logical_to_spec(("nonexistent",), LOGICAL_RULES)


def test_impossible_meshes_are_refused():
    with pytest.raises(ShardingError, match="needs 16 devices but 8"):
        make_mesh(data=4, tensor=4)
    with pytest.raises(ShardingError, match="not divisible by 3"):
        make_mesh(data=-1, tensor=3)
    with pytest.raises(ShardingError, match="only one mesh axis may be -1"):
        make_mesh(data=-1, tensor=-1)
    with pytest.raises(ShardingError, match="positive integer or -1"):
        make_mesh(fsdp=0)
    mesh = make_mesh(fsdp=2, tensor=-1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
