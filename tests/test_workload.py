"""The synthetic chat workload: prompts grow by each round's question and answer, share the system prompt, and are
reproducible from the seed."""
import pytest

from kvbm.tools.workload import ChatWorkload


def test_prompts_grow_with_history_and_share_the_system_prompt():
    w = ChatWorkload(num_users=3, num_rounds=3, system_prompt_tokens=50, question_tokens=7, answer_tokens=5,
                     active_users=2)
    reqs = list(w.requests())
    assert len(reqs) == w.num_requests == 9
    assert [(r.user, r.round) for r in reqs[:6]] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    system = reqs[0].prompt[:50]
    by_user = {}
    for r in reqs:
        assert r.prompt[:50] == system
        if r.user in by_user:
            prev = by_user[r.user]
            assert r.prompt[: len(prev.prompt)] == prev.prompt  # the previous prompt is a prefix
            assert r.prompt[len(prev.prompt): len(prev.prompt) + 5] == prev.answer
            assert len(r.prompt) == len(prev.prompt) + 5 + 7
        by_user[r.user] = r
    assert reqs[0].prompt[50:] != reqs[1].prompt[50:]  # users ask different questions


def test_reproducible_and_seeded():
    a = [r.prompt for r in ChatWorkload(num_users=2, num_rounds=2, seed=1).requests()]
    b = [r.prompt for r in ChatWorkload(num_users=2, num_rounds=2, seed=1).requests()]
    c = [r.prompt for r in ChatWorkload(num_users=2, num_rounds=2, seed=2).requests()]
    assert a == b and a != c


@pytest.mark.parametrize("field, value", [("num_users", 0), ("active_users", -1), ("answer_tokens", -5)])
def test_rejects_bad_shapes(field, value):
    with pytest.raises(ValueError, match=field):
        ChatWorkload(**{field: value})
