import pytest
import torch
from torch import nn

from nascore.spaces import SPACES, get_space
from nascore.supernet import MixedOp, PartialChannelMixedOp, SupernetConfig, channel_shuffle, dag_edges

DARTS_OPS = get_space("darts").uniform_ops


def test_dag_edge_order_matches_the_spec():
    assert dag_edges(2, 4)[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert len(dag_edges(2, 4)) == 14
    # NB201: 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2 (nodes numbered from the input)
    assert [(i + 1, j) for i, j in dag_edges(1, 3)] == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channels_k1_without_shuffle_equals_the_plain_mixed_op(stride):
    torch.manual_seed(0)
    plain = MixedOp(DARTS_OPS, 8, stride, affine=False, pool_bn=True)
    pc = PartialChannelMixedOp(DARTS_OPS, 8, stride, affine=False, pool_bn=True, k=1, shuffle=False)
    pc.mixed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 8, 8)
    w = torch.softmax(torch.randn(len(DARTS_OPS)), 0)
    cols = list(range(len(DARTS_OPS)))
    torch.testing.assert_close(pc(x, w, cols), plain(x, w, cols), rtol=0, atol=0)


def test_channel_shuffle_moves_channel_g_c_plus_i_to_i_k_plus_g():
    k, c = 4, 3                               # 12 channels, 4 groups of 3
    x = torch.arange(k * c, dtype=torch.float32).view(1, k * c, 1, 1)
    y = channel_shuffle(x, k).flatten()
    for g in range(k):
        for i in range(c):
            assert y[i * k + g] == g * c + i


def test_channel_shuffle_keeps_the_memory_format():
    # channels_last in, channels_last out (one copy): an NCHW shuffle turned every later op of a
    # channels_last PC-DARTS search NCHW
    x = torch.randn(2, 12, 3, 5)
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = channel_shuffle(x.contiguous(memory_format=fmt), 4)
        assert torch.equal(y, torch.channel_shuffle(x, 4))
        assert y.is_contiguous(memory_format=fmt)


def test_partial_channels_only_first_quarter_goes_through_ops_and_stride2_pools_the_rest():
    torch.manual_seed(0)
    pc = PartialChannelMixedOp(["skip_connect"], 8, 2, affine=False, pool_bn=False, k=4, shuffle=False)
    x = torch.randn(1, 8, 4, 4)
    y = pc(x, torch.ones(1), [0])
    assert y.shape == (1, 8, 2, 2)
    torch.testing.assert_close(y[:, 2:], nn.functional.max_pool2d(x[:, 2:], 2, 2))
    with pytest.raises(ValueError, match="must divide"):
        PartialChannelMixedOp(["skip_connect"], 6, 1, affine=False, pool_bn=False, k=4, shuffle=True)


@pytest.mark.parametrize("space", SPACES.names())
def test_every_space_builds_runs_and_derives(space):
    sp = get_space(space)
    layers = 1 if space == "nb201" else 3
    net = sp.build_supernet(SupernetConfig(init_channels=4, layers=layers))
    out = net(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
    g = net.derive()
    assert type(g).__name__ == ("NB201Genotype" if space == "nb201" else "Genotype")
    edges = 6 if space == "nb201" else 14
    for ct, alpha in net.alphas.items():
        assert alpha.shape == (edges, len(sp.edge_ops[ct][0]))
        assert alpha.abs().max() < 0.01          # 1e-3 N(0,1) init


def test_search_cells_use_non_affine_bn_and_pools_get_a_bn_in_the_darts_space():
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=3))
    cell_bns = [m for c in net.cells for m in c.modules() if isinstance(m, nn.BatchNorm2d)]
    assert cell_bns and all(not bn.affine for bn in cell_bns)
    assert net.stem[1].affine
    pool = net.cells[0].edges[0].ops[1]          # max_pool_3x3 on a normal edge
    assert isinstance(pool, nn.Sequential) and isinstance(pool[1], nn.BatchNorm2d)
    nb = get_space("nb201").build_supernet(SupernetConfig(init_channels=4, layers=1))
    conv = nb.blocks[0].edges[0].ops[3][1]       # nor_conv_3x3's conv: bias because BN is not affine
    assert conv.bias is not None
    assert not isinstance(nb.blocks[0].edges[0].ops[4], nn.Sequential)   # NB201 pooling: no BN


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_random_features_freeze_every_conv_and_make_cell_bn_affine(space):
    layers = 1 if space == "nb201" else 3
    net = get_space(space).build_supernet(SupernetConfig(init_channels=4, layers=layers,
                                                         random_features=True))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(not p.requires_grad for m in convs for p in m.parameters())
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bn.affine and bn.weight.requires_grad for bn in bns)
    assert not net.classifier.weight.requires_grad
    trainable = {id(p) for p in net.weight_parameters()}
    assert trainable == {id(p) for bn in bns for p in bn.parameters()}
    if space == "nb201":   # RF NB201 convs have no bias (BN is affine)
        assert all(m.bias is None for m in convs)


def test_random_features_options_keep_stem_and_classifier_trainable():
    net = get_space("darts").build_supernet(SupernetConfig(
        init_channels=4, layers=3, random_features=True, freeze_stem_conv=False, train_classifier=True))
    assert net.stem[0].weight.requires_grad and net.classifier.weight.requires_grad


def test_edge_normalisation_softmaxes_over_each_nodes_incoming_edges():
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=3,
                                                           edge_normalization=True))
    with torch.no_grad():
        net.betas["normal"].copy_(torch.arange(14, dtype=torch.float32))
    ew = net.edge_weights("normal")
    sums = [ew[s:s + n].sum().item() for s, n in [(0, 2), (2, 3), (5, 4), (9, 5)]]
    assert sums == pytest.approx([1, 1, 1, 1])
    # derivation weights are softmax(α) · softmax_i(β)
    w = net.derivation_weights()["normal"][0]
    expected = net.op_weights("normal") * ew[:, None]
    torch.testing.assert_close(torch.tensor(w), expected.detach())


def test_active_columns_switch_ops_on_in_order_of_entry():
    net = get_space("nb201").build_supernet(SupernetConfig(init_channels=4, layers=1))
    net.set_active_columns([3])
    assert net.active_columns() == [3]
    assert net.op_weights("cell").shape == (6, 1)
    before = net.alphas["cell"].detach().clone()
    net.activate_column(0)
    assert net.active_columns() == [3, 0]
    assert torch.equal(net.alphas["cell"][:, 3], before[:, 3])        # learned column kept
    w, names = net.derivation_weights()["cell"]
    assert names[0] == ["nor_conv_3x3", "none"]                       # order of entry
    with pytest.raises(ValueError, match="already active"):
        net.activate_column(3)
    out = net(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


def test_search_time_drop_path_drops_samples_of_every_op_but_the_identity():
    torch.manual_seed(0)
    edge = MixedOp(["skip_connect", "sep_conv_3x3"], 4, 1, affine=False, pool_bn=True)
    x = torch.randn(64, 4, 6, 6)
    skip = edge(x, torch.ones(1), [0])
    edge.drop_prob = 0.5
    assert torch.equal(edge(x, torch.ones(1), [0]), skip)          # identity: never dropped
    y = edge(x, torch.ones(1), [1])
    dropped = (y.flatten(1).abs().sum(1) == 0).float().mean()
    assert 0.3 < dropped < 0.7                                       # about half the samples
    edge.eval()
    assert (edge(x, torch.ones(1), [1]).flatten(1).abs().sum(1) > 0).all()   # off in eval mode


def test_supernet_sets_drop_path_on_every_mixed_op():
    net = get_space("darts").build_supernet(SupernetConfig(init_channels=4, layers=3, partial_channels=2))
    net.set_drop_path(0.3)
    mixed = [m for m in net.modules() if isinstance(m, MixedOp)]
    assert len(mixed) == 3 * 14 and all(m.drop_prob == 0.3 for m in mixed)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        net.set_drop_path(1.0)
