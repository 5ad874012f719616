"""Prompt pools and key-query selection on hand-made keys and queries."""

from __future__ import annotations

import pytest
import torch

from pgp_peft.prompts import (
    ImagePrompt,
    L2PPromptPool,
    PrefixPromptPool,
    batchwise_majority,
    cosine_similarity_to_keys,
    select_by_key,
)

# Four keys along the axes of R^4 with very different norms: selection must ignore the norm.
KEYS = torch.diag(torch.tensor([0.1, 5.0, 1.0, 100.0]))


# ----------------------------------------------------------------------------- select_by_key
def test_cosine_similarity_matches_hand_computation():
    query = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    sim = cosine_similarity_to_keys(query, KEYS)
    torch.testing.assert_close(sim, torch.tensor([[0.6, 0.8, 0.0, 0.0]]))


def test_select_by_key_picks_top_k_by_cosine_not_dot_product():
    query = torch.tensor(
        [
            [3.0, 2.0, 1.0, 0.0],  # by cosine: 0 > 1 > 2 (dot product would prefer 1)
            [0.0, 0.1, 1.0, 2.0],  # 3 > 2 > 1
            [1.0, 0.0, 0.0, 0.9],  # 0 > 3 (dot product would prefer 3 by far)
        ]
    )
    selection = select_by_key(query, KEYS, top_k=2)
    assert selection.indices.tolist() == [[0, 1], [3, 2], [0, 3]]
    expected_sim = torch.nn.functional.normalize(query, dim=-1)  # keys are axis-aligned
    torch.testing.assert_close(selection.similarity, expected_sim)
    torch.testing.assert_close(selection.selected_similarity, expected_sim.gather(1, selection.indices))
    # pull term: selected similarities summed over k, averaged over the batch
    expected_pull = expected_sim.gather(1, selection.indices).sum() / 3
    torch.testing.assert_close(selection.pull_constraint(), expected_pull)


def test_forced_ids_override_choice_and_pull_uses_forced_keys():
    query = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.1, 1.0, 2.0]])
    keys = KEYS.clone().requires_grad_(True)
    forced = torch.tensor([[2], [1]])
    selection = select_by_key(query, keys, top_k=1, forced_ids=forced)
    assert torch.equal(selection.indices, forced)
    sim = torch.nn.functional.normalize(query, dim=-1)
    torch.testing.assert_close(selection.selected_similarity, torch.stack([sim[0, 2:3], sim[1, 1:2]]))
    selection.pull_constraint().backward()
    # only the forced keys (1, 2) get a gradient; 0 and 3 (the keys top-k would pick) get none
    assert keys.grad[0].abs().sum() == 0 and keys.grad[3].abs().sum() == 0
    assert keys.grad[1].abs().sum() > 0 and keys.grad[2].abs().sum() > 0


def test_forced_ids_ignore_batchwise_vote():
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.0, 0.0]])
    forced = torch.tensor([[3], [2]])
    selection = select_by_key(query, KEYS, top_k=1, forced_ids=forced, batchwise=True)
    assert torch.equal(selection.indices, forced)


# ----------------------------------------------------------------------------- batch-wise majority
def test_batchwise_majority_returns_most_frequent_ids_for_every_sample():
    indices = torch.tensor([[0, 2], [0, 2], [0, 1], [3, 0], [4, 2]])  # 0: 4x, 2: 3x, 1/3/4: once
    voted = batchwise_majority(indices, pool_size=6, top_k=2)
    assert voted.shape == indices.shape
    assert all(set(row) == {0, 2} for row in voted.tolist())
    assert torch.equal(voted, voted[:1].expand_as(voted))


def test_batchwise_majority_top1():
    indices = torch.tensor([[3], [1], [3], [2], [3], [1]])
    assert batchwise_majority(indices, pool_size=5, top_k=1).flatten().tolist() == [3] * 6


def test_select_by_key_batchwise_uses_the_vote_but_per_sample_similarity():
    query = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [1.0, 0.1, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],  # alone it would pick 2
            [0.9, 0.0, 0.0, 0.1],
        ]
    )
    alone = select_by_key(query, KEYS, top_k=1)
    assert alone.indices.flatten().tolist() == [0, 0, 2, 0]
    voted = select_by_key(query, KEYS, top_k=1, batchwise=True)
    assert voted.indices.flatten().tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(voted.selected_similarity, voted.similarity[:, :1])


# ----------------------------------------------------------------------------- L2P pool
def test_l2p_pool_parameter_shapes_and_uniform_init():
    torch.manual_seed(0)
    pool = L2PPromptPool(pool_size=7, length=3, hidden_size=8, top_k=2)
    assert pool.prompt.shape == (7, 3, 8) and pool.key.shape == (7, 8)
    for tensor in (pool.prompt, pool.key):
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
        assert tensor.std() > 0.4  # U(-1, 1) has std 0.577, not a small-normal init
    assert pool.num_tokens == 6


def test_l2p_gather_shape_and_content():
    torch.manual_seed(0)
    pool = L2PPromptPool(pool_size=5, length=3, hidden_size=8, top_k=2)
    indices = torch.tensor([[4, 1], [0, 3], [2, 2]])
    tokens = pool.gather(indices)
    assert tokens.shape == (3, 2 * 3, 8)
    for b in range(3):
        for j in range(2):
            assert torch.equal(tokens[b, 3 * j : 3 * (j + 1)], pool.prompt[indices[b, j]])


def test_l2p_select_uses_keys_and_gather_grad_reaches_only_selected_rows():
    pool = L2PPromptPool(pool_size=4, length=2, hidden_size=4, top_k=1)
    with torch.no_grad():
        pool.key.copy_(KEYS)
    selection = pool.select(torch.tensor([[0.0, 0.0, 1.0, 0.2], [0.0, 1.0, 0.0, 0.0]]))
    assert selection.indices.flatten().tolist() == [2, 1]
    pool.gather(selection.indices).sum().backward()
    row_grad = pool.prompt.grad.abs().sum(dim=(1, 2))
    assert row_grad[0] == 0 and row_grad[3] == 0
    assert row_grad[1] > 0 and row_grad[2] > 0


def test_l2p_without_keys_uses_first_k_prompts():
    pool = L2PPromptPool(pool_size=5, length=2, hidden_size=4, top_k=3, use_keys=False)
    assert pool.key is None
    selection = pool.select(torch.randn(2, 4))
    assert selection.indices.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_l2p_batchwise_pool_option():
    pool = L2PPromptPool(pool_size=4, length=2, hidden_size=4, top_k=1, batchwise=True)
    with torch.no_grad():
        pool.key.copy_(KEYS)
    query = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    assert pool.select(query).indices.flatten().tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- DualPrompt prefixes
def _prefix_pool(top_k: int = 1) -> PrefixPromptPool:
    torch.manual_seed(0)
    return PrefixPromptPool(
        hidden_size=4, g_layers=[0, 1], g_length=2, e_layers=[2, 3, 4], e_length=3, pool_size=4, top_k=top_k
    )


def test_prefix_pool_parameter_shapes():
    pool = _prefix_pool()
    assert pool.g_prompt.shape == (2, 2, 2, 4)  # (layers, key/value, L_g, D)
    assert pool.e_prompt.shape == (3, 2, 4, 3, 4)  # (layers, key/value, P, L_e, D)
    assert pool.e_key.shape == (4, 4)


def test_prefix_pool_g_e_prompts_and_e_keys_start_uniform_like_the_reference():
    torch.manual_seed(0)
    pool = PrefixPromptPool(
        hidden_size=16, g_layers=[0, 1], g_length=5, e_layers=[2, 3, 4], e_length=5, pool_size=10
    )
    for tensor in (pool.g_prompt, pool.e_prompt, pool.e_key):  # the reference: nn.init.uniform_(-1, 1)
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0
        assert abs(tensor.std().item() - 3**-0.5) < 0.06  # U(-1, 1) has std 1/√3


def test_linear_init_is_nn_linear_default_bound():
    """The reference CLIP image prompt is an `nn.Linear(D, L)` weight: U(±1/√D) over the last axis."""
    torch.manual_seed(0)
    prompt = ImagePrompt(length=10, hidden_size=64, init="linear")
    bound = 64**-0.5
    assert prompt.prompt.abs().max() <= bound
    assert abs(prompt.prompt.std().item() - bound / 3**0.5) < 0.01
    reference = torch.nn.Linear(64, 10, bias=False)  # same distribution as the reference's module
    assert reference.weight.abs().max() <= bound


def test_prefixes_shapes_per_layer_and_content():
    pool = _prefix_pool()
    indices = torch.tensor([[3], [0], [2]])
    prefixes = pool.prefixes(3, indices)
    assert sorted(prefixes) == [0, 1, 2, 3, 4]
    for layer in (0, 1):
        key, value = prefixes[layer]
        assert key.shape == value.shape == (3, 2, 4)
        for b in range(3):
            assert torch.equal(key[b], pool.g_prompt[layer, 0])
            assert torch.equal(value[b], pool.g_prompt[layer, 1])
    for position, layer in enumerate((2, 3, 4)):
        key, value = prefixes[layer]
        assert key.shape == value.shape == (3, 3, 4)
        for b in range(3):
            slot = int(indices[b, 0])
            assert torch.equal(key[b], pool.e_prompt[position, 0, slot])
            assert torch.equal(value[b], pool.e_prompt[position, 1, slot])


def test_prefixes_top2_concatenate_slots_in_order():
    pool = _prefix_pool(top_k=2)
    indices = torch.tensor([[1, 3], [2, 0]])
    key, value = pool.prefixes(2, indices)[2]
    assert key.shape == (2, 6, 4)
    assert torch.equal(key[0], torch.cat([pool.e_prompt[0, 0, 1], pool.e_prompt[0, 0, 3]]))
    assert torch.equal(value[1], torch.cat([pool.e_prompt[0, 1, 2], pool.e_prompt[0, 1, 0]]))


def test_prefixes_without_indices_give_only_g_layers():
    assert sorted(_prefix_pool().prefixes(2, None)) == [0, 1]


def test_e_prompt_selection_is_per_sample():
    pool = _prefix_pool()
    with torch.no_grad():
        pool.e_key.copy_(KEYS)
    query = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0]])
    selection = pool.select(query)
    assert selection.indices.flatten().tolist() == [3, 0, 1]
    key, _ = pool.prefixes(3, selection.indices)[3]
    for b, slot in enumerate([3, 0, 1]):
        assert torch.equal(key[b], pool.e_prompt[1, 0, slot])


def test_prefix_pool_with_zero_lengths_has_nothing():
    pool = PrefixPromptPool(4, [0, 1], 0, [2, 3], 0, pool_size=3)
    assert pool.g_prompt is None and pool.e_prompt is None and pool.e_key is None
    assert pool.select(torch.randn(2, 4)) is None
    assert pool.prefixes(2, None) == {}
    assert list(pool.parameters()) == []


def test_copy_slot_copies_prompt_only_into_target():
    pool = _prefix_pool()
    e_before, key_before = pool.e_prompt.detach().clone(), pool.e_key.detach().clone()
    pool.copy_slot(1, 2)
    assert torch.equal(pool.e_prompt[:, :, 2], e_before[:, :, 1])
    for slot in (0, 1, 3):
        assert torch.equal(pool.e_prompt[:, :, slot], e_before[:, :, slot])
    assert torch.equal(pool.e_key, key_before)  # the reference's shared pool copies prompts, not keys
    assert pool.e_prompt.requires_grad  # still a trainable leaf
    pool.copy_slot(0, 9)  # out of range: no-op
    assert torch.equal(pool.e_prompt[:, :, 0], e_before[:, :, 0])


def test_image_prompt_tokens_expand_the_shared_prompt():
    prompt = ImagePrompt(length=3, hidden_size=4)
    tokens = prompt.tokens(5)
    assert tokens.shape == (5, 3, 4)
    assert all(torch.equal(tokens[b], prompt.prompt) for b in range(5))


def test_unknown_init_raises():
    with pytest.raises(ValueError, match="xavier"):
        L2PPromptPool(2, 2, 4, 1, prompt_init="xavier")
