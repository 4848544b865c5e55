"""Rule-based rewards for the PPO tests, plugged in through train.ppo.reward_fn=ppo_rewards:NAME."""

from chatdata import COLOURS, FILLERS

TARGET = "gold"
TARGET_ID = ["<unk>", "system", "user", "assistant", *FILLERS, *COLOURS].index(TARGET)
"""The target word's id in chatdata.word_tokenizer's vocabulary."""


def target_word(prompt_ids, response_ids) -> float:
    """A probability that rises with the share of the response's tokens that are the target word."""
    share = sum(t == TARGET_ID for t in response_ids) / max(len(response_ids), 1)
    return 0.1 + 0.8 * share


def not_a_number(prompt_ids, response_ids) -> float:
    return float("nan")
