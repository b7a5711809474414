"""Chain attribute accuracy (moon_rl/data/chains.py): hand-written chains with known right / wrong / chance shares."""

from __future__ import annotations

import pytest

from moon_rl.data.chains import (
    attribute_vocabulary,
    chain_attribute_accuracy,
    named_values,
    reward_prefers_truth,
    value_spans,
)

# colour: red 2, blue 1, navy blue 1 (of 4); material: wool 3, silk 1 (of 4).
VOCABULARY = {"colour": {"blue": 1, "navy blue": 1, "red": 2}, "material": {"silk": 1, "wool": 3}}


def test_vocabulary_counts_products_per_value_case_insensitively():
    attributes = [{"colour": "Red"}, {"colour": "red ", "material": "wool"}, {"colour": "navy blue"}, {}, {"size": ""}]
    # "Red" and "red " are one value; an empty value is no value (so `size` is no attribute at all).
    assert attribute_vocabulary(attributes) == {"colour": {"navy blue": 1, "red": 2}, "material": {"wool": 1}}


def test_right_wrong_and_chance_on_hand_written_chains():
    chains = [
        "A bored shopper's jumper in wool.",  # colour: `red` is not a word of `bored` -> neither; material right
        "Red and blue stripes, silk.",        # colour: names right and wrong -> both; material wrong
        "A navy blue coat.",                  # colour: the phrase, not a wrong `blue` -> right only; no material
        "Blue.",                              # colour: blue is not navy blue -> wrong; material named none
        "<think>red</think>",                 # tags do not glue words together -> right
    ]
    attributes = [{"colour": "red", "material": "wool"}, {"colour": "red", "material": "wool"},
                  {"colour": "navy blue"}, {"colour": "Navy Blue", "material": "silk"}, {"colour": "red"}]
    found = chain_attribute_accuracy(chains, attributes, VOCABULARY)
    assert found["colour"] == {"right": pytest.approx(3 / 5), "wrong": pytest.approx(2 / 5),
                               "chance": pytest.approx(0.5**2 + 0.25**2 + 0.25**2), "n": 5}
    # Products 2 and 4 have no material: they are not in its n.
    assert found["material"] == {"right": pytest.approx(1 / 3), "wrong": pytest.approx(1 / 3),
                                 "chance": pytest.approx(0.75**2 + 0.25**2), "n": 3}


def test_longest_value_wins_and_unknown_attributes_are_skipped():
    assert named_values("navy blue and blue wool", VOCABULARY) == {"colour": {"navy blue", "blue"},
                                                                   "material": {"wool"}}
    # `size` is not in the vocabulary: no entry, and no error.
    assert chain_attribute_accuracy(["red"], [{"colour": "red", "size": "xl"}], VOCABULARY) == {
        "colour": {"right": 1.0, "wrong": 0.0, "chance": pytest.approx(0.375), "n": 1}}


def test_default_vocabulary_is_the_products_own_and_lengths_must_match():
    found = chain_attribute_accuracy(["blue", "blue", "red"], [{"colour": "red"}, {"colour": "blue"},
                                                               {"colour": "blue"}])
    # Vocabulary {blue: 2, red: 1}: chance 4/9 + 1/9.
    assert found == {"colour": {"right": pytest.approx(1 / 3), "wrong": pytest.approx(2 / 3),
                                "chance": pytest.approx(5 / 9), "n": 3}}
    with pytest.raises(ValueError, match="2 chains for 1 attribute sets"):
        chain_attribute_accuracy(["a", "b"], [{"colour": "red"}], VOCABULARY)


def test_value_spans_are_the_whole_word_values_of_any_attribute():
    vocabulary = {"colour": {"red": 1, "navy blue": 1, "blue": 1}, "material": {"wool": 2}}
    chain = "colour navy blue. material wool. tired of red"
    assert [chain[a:b] for a, b in value_spans(chain, vocabulary)] == ["navy blue", "wool", "red"]
    assert value_spans("Colour RED.", vocabulary) == [(7, 10)]


def test_reward_prefers_truth_counts_only_groups_that_must_choose_and_ties_are_no_preference():
    chains = [
        "colour red. material wool.", "colour blue. material wool.",       # group 0: colour disagrees, red best
        "colour red. material silk.", "colour red and blue. material silk.",  # group 1: two colours named = not right
        "colour blue. material wool.", "colour red. material wool.",       # group 2: tie on colour
        "material wool.", "colour navy blue. material silk.",               # group 3: no colour / a wrong one
    ]
    attributes = [{"colour": "red", "material": "wool"}] * 2 + [{"colour": "red", "material": "silk"}] * 2 \
        + [{"colour": "red", "material": "wool"}] * 2 + [{"colour": "navy blue", "material": "wool"}] * 2
    rewards = [0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.3, float("nan")]
    found = reward_prefers_truth(chains, attributes, rewards, 2, VOCABULARY)
    # colour: group 0 right wins; group 1 the right chain (0.2) loses to "red and blue" (0.8); group 2 ties;
    # group 3 the right chain has no reward (NaN never wins) but the other (no colour) has 0.3: it loses.
    # material: only group 3 must choose (truth wool): chain 6 names it (0.3), chain 7 names silk (NaN): a win.
    assert found == {"colour": (1, 4), "material": (1, 1)}
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        reward_prefers_truth(chains, attributes, rewards, 3, VOCABULARY)
