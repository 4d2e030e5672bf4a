"""The router's environment: episodes from the splits, rollouts in one routing stream, rewards from the real metrics."""
import copy
import json
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from bem import BEMConfig, attach_bem, bem_disabled, bem_layers
from bem.data.batches import prompt_ids
from bem.evaluate import generate, greedy
from bem.models import embedded_path, tiny
from bem.router.env import (LEAD_IN, ROUTER_TASKS, Episode, Part, Rollout, check_composite_leakage, composite_items,
                            mixed_stream, part_score, reward, rollout, turn_ids)
from bem.tasks import SPECS

# --- a small data root: real items of the prepared data (v1), placed in splits that exercise the rules -------------
QA = {
    "test": [
        {"answers": ["curd"],
         "evidence": ["bean curd, tofu: cheeselike food made of curdled soybean milk. A kind of curd.",
                      "curd: a coagulated liquid resembling milk curd. A kind of foodstuff.",
                      "cheese: a solid food prepared from the pressed curd of milk."],
         "features": [0.835967, 0.030973, 0.438885, 1.0, 0.600287], "id": "n07709881:hypernym", "kind": "hypernym",
         "question": "\"bean curd\" (cheeselike food made of curdled soybean milk) is a kind of what?",
         "slice_a": False, "synset": "n07709881"},
        {"answers": ["leather"], "evidence": ["glove leather: leather suitable for making gloves. A kind of leather.",
                                              "leatherwork: work made of leather. A kind of work.",
                                              "patent leather: leather with a hard glossy surface. A kind of leather."],
         "features": [0.926355, 0.246033, 0.0597, 1.0, 0.691453], "id": "n14762664:hypernym", "kind": "hypernym",
         "question": "\"glove leather\" (leather suitable for making gloves) is a kind of what?", "slice_a": True,
         "synset": "n14762664"}],
    "train": [
        {"answers": ["chef"], "evidence": ["pastry cook: a chef who specializes in pastry. A kind of chef."],
         "features": [0.947561, 0.165083, 0.171205, 1.0, 0.750327], "id": "n10405320:hypernym", "kind": "hypernym",
         "question": "\"pastry cook\" (a chef who specializes in pastry) is a kind of what?", "slice_a": True,
         "synset": "n10405320"}],
    "dev": [
        {"answers": ["tetri"],
         "evidence": ["tetri: 100 tetri equal 1 lari in Georgia. A kind of Georgian monetary unit."],
         "features": [0.789159, 0.292304, 0.027749, 1.0, 0.516483], "id": "n13700766:gloss", "kind": "gloss",
         "question": "Which word means \"100 tetri equal 1 lari in Georgia\"?", "slice_a": True,
         "synset": "n13700766"}],
}
BIBLE = {
    "test": [
        ("II Samuel 1:1", "Y ACONTECIÓ después de la muerte de Saúl, que vuelto David de la derrota de los "
         "Amalecitas, estuvo dos días en Siclag:",
         "After the death of Saul, when David had returned from the slaughter of the Amalekites, and David had stayed "
         "two days in Ziklag,"),
        ("Psalms 61:4", "Yo habitaré en tu tabernáculo para siempre: estaré seguro bajo la cubierta de tus alas.",
         "I will dwell in your tent forever. I will take refuge in the shelter of your wings. Selah."),
        ("Ezekiel 14:5", "Para tomar á la casa de Israel en su corazón, que se han apartado de mí todos ellos en "
         "sus ídolos.",
         "that I may take the house of Israel in their own heart, because they are all estranged from me through their "
         "idols.”’")],
    "train": [("Genesis 1:1", "EN el principio crió Dios los cielos y la tierra.",
               "In the beginning, God created the heavens and the earth.")],
    "dev": [("Job 1:1", "HUBO un varón en tierra de Hus, llamado Job; y era este hombre perfecto y recto, y temeroso "
             "de Dios, y apartado del mal.", "There was a man in the land of Uz, whose name was Job. That man was "
             "blameless and upright, and one who feared God, and turned away from evil.")],
}
WORDS = {  # (synset id, word, definition, synonyms, example); "slaughter" is longer than "death" but only in train
    "test": [("n00219575", "death", "the act of killing", [], "he had two deaths on his conscience"),
             ("n00027167", "location", "a point or extent in space", [], ""),
             ("n03507048", "heart", "a playing card in the major suit that has one or more red hearts on it", [],
              "he led the queen of hearts"),
             ("n07849912", "curd", "coagulated milk; used to make cheese", [],
              "Little Miss Muffet sat on a tuffet eating some curds and whey")],
    "train": [("n00223854", "slaughter", "the killing of animals (as for food)", [], ""),
              ("n04411264", "tent", "a portable shelter (usually of canvas stretched over supporting poles and "
               "fastened to the ground with ropes and pegs)", ["collapsible shelter"],
               "he pitched his tent near the creek"),
              ("n00235435", "beginning", "the act of starting something", ["start", "commencement"],
               "he was responsible for the beginning of negotiations")],
    "dev": [("n04191595", "shelter", "a structure that provides privacy and protection from danger", [], "")],
}


def _entries(rows):
    """wordnet_define and json_format items of WordNet entries, as bem.data.prepare builds them."""
    define, as_json = [], []
    for sid, word, definition, synonyms, example in rows:
        define.append({"id": sid, "pos": "noun", "target": definition, "word": word})
        source = f"{word} (noun): {definition}" + (f". Also: {', '.join(synonyms)}" if synonyms else "") + \
            (f'. Example: "{example}"' if example else "")
        as_json.append({"id": sid, "source": source, "target": {"definition": definition, "example": example,
                                                               "pos": "noun", "synonyms": synonyms, "word": word}})
    return define, as_json


def _write(root, task, split, items):
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / f"{split}.jsonl").write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("router_data")
    for split in ("train", "dev", "test"):
        _write(root, "wordnet_qa", split, QA[split])
        _write(root, "bible_translate", split, [{"book": ref.rsplit(" ", 1)[0], "id": ref, "source": es, "target": en}
                                                for ref, es, en in BIBLE[split]])
        define, as_json = _entries(WORDS[split])
        _write(root, "wordnet_define", split, define)
        _write(root, "json_format", split, as_json)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as bem.models.load_base does
    return tok


# --- episodes --------------------------------------------------------------------------------------------------------
def test_mixed_stream_is_balanced_seeded_and_hides_the_task(root):
    stream = mixed_stream("test", 6, seed=0, root=root)
    # n % 4 = 2: the first two tasks of ROUTER_TASKS get one more
    assert Counter(ep.parts[0].task for ep in stream) == {"wordnet_qa": 2, "bible_translate": 2, "wordnet_define": 1,
                                                          "json_format": 1}
    assert Counter(ep.parts[0].task for ep in mixed_stream("test", 8, root=root)) == dict.fromkeys(ROUTER_TASKS, 2)
    assert [ep.id for ep in mixed_stream("test", 6, seed=0, root=root)] == [ep.id for ep in stream]
    assert [ep.id for ep in mixed_stream("test", 6, seed=1, root=root)] != [ep.id for ep in stream]
    assert len({ep.id for ep in stream}) == 6
    for ep in stream:
        (part,) = ep.parts
        assert ep.id == f"{part.task}:{part.item['id']}" and part.prompt == SPECS[part.task].prompt(part.item)
        # the router sees the prompt and the side vector: evidence features for wordnet_qa, zeros for the others
        own = part.item["features"] if part.task == "wordnet_qa" else [0.0] * 5
        assert part.side == pytest.approx(own, abs=1e-6) and len(part.side) == 5


def test_composites_take_a_word_of_the_reference_from_the_same_split(root):
    episodes = composite_items("test", 5, root=root)
    assert [ep.parts[0].task for ep in episodes] == ["bible_translate", "wordnet_qa"] * 2 + ["bible_translate"]
    by_first = {ep.parts[0].item["id"]: ep.parts[1] for ep in episodes}
    # the longest word of the verse with an entry in the test split: "death" ("slaughter" is a train word)
    assert by_first["II Samuel 1:1"].item["id"] == "n00219575"
    assert by_first["Ezekiel 14:5"].item["id"] == "n03507048"  # "heart"
    assert by_first["n07709881:hypernym"].item["id"] == "n07849912"  # the answer "curd"
    test_ids = {sid for sid, *_ in WORDS["test"]}
    for first_id in ("Psalms 61:4", "n14762664:hypernym"):  # no word of the test split: a hash-chosen test item
        assert by_first[first_id].item["id"] in test_ids
    for ep in episodes:
        first, second = ep.parts
        assert second.task in ("json_format", "wordnet_define") and second.task != first.task
        assert second.prompt == LEAD_IN + SPECS[second.task].prompt(second.item)
        assert first.prompt == SPECS[first.task].prompt(first.item) and second.side == first.side
        assert ep.id == f"{first.task}:{first.item['id']}+{second.task}:{second.item['id']}"
    assert {ep.parts[1].task for ep in episodes} == {"json_format", "wordnet_define"}  # both kinds of second part
    assert composite_items("test", 5, root=root) == episodes  # deterministic
    assert [ep.id for ep in composite_items("test", None, root=root)] == [ep.id for ep in episodes]  # all 3 + 2


def test_composite_leakage_check_counts_what_crosses_splits(root, tmp_path):
    assert check_composite_leakage(root) == {"composites_train": 2, "composites_dev": 2, "composites_test": 5,
                                             "cross_split": 0, "duplicate_ids": 0, "dev_in_train": 0,
                                             "test_in_train": 0}
    # a train entry copied into the test split ("slaughter": longer than "death") must be caught
    import shutil
    leaky = tmp_path / "leaky"
    shutil.copytree(root, leaky)
    define, as_json = _entries(WORDS["test"] + WORDS["train"][:1])
    _write(leaky, "wordnet_define", "test", define)
    _write(leaky, "json_format", "test", as_json)
    report = check_composite_leakage(leaky)
    assert report["cross_split"] >= 1 and report["test_in_train"] >= 1


# --- the next user turn ----------------------------------------------------------------------------------------------
def test_next_turn_tokens_are_derived_from_the_chat_template(tokenizer):
    expected = tokenizer("<|im_end|>\n<|im_start|>user\nNext: B<|im_end|>\n<|im_start|>assistant\n",
                         add_special_tokens=False)["input_ids"]
    assert turn_ids(tokenizer, ["A", "Next: B"]) == expected
    reply = tokenizer("Hello there.", add_special_tokens=False)["input_ids"]
    conversation = tokenizer.apply_chat_template(
        [{"role": "user", "content": "A"}, {"role": "assistant", "content": "Hello there."},
         {"role": "user", "content": "Next: B"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(conversation) == prompt_ids(tokenizer, "A") + reply + expected
    broken = copy.copy(tokenizer)
    broken.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}<u>{{ m.content }}</u>{% endif %}"
                            "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")  # drops assistant turns
    with pytest.raises(ValueError, match="drops or rewrites earlier turns"):
        turn_ids(broken, ["A", "B"])
    broken.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}"
                            "[{{ m.content | length }}]{% endif %}\n{% endfor %}{% if add_generation_prompt %}"
                            "<assistant>{% endif %}")
    with pytest.raises(ValueError, match="depends on the reply"):
        turn_ids(broken, ["A", "B"])
    with pytest.raises(ValueError, match="at least two"):
        turn_ids(tokenizer, ["A"])


# --- rollouts --------------------------------------------------------------------------------------------------------
SITES = ["o_proj", "down_proj"]
SHARPEN = 8.0


def _tiny_bem(tokenizer, controller: str):
    """A tiny llama over SmolLM2's vocabulary with BEM attached and random U (and controller) weights. Its queries
    and keys are scaled up: with near-uniform attention wrong position ids (gaps at pads) would hardly show."""
    model = tiny("llama", vocab_size=len(tokenizer))
    side_dim = 0 if controller == "static" else 5
    attach_bem(model, BEMConfig(rank=4, alpha=8.0, sites=SITES, controller=controller, chunk_size=4, side_dim=side_dim))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(SHARPEN)
        for layer in bem_layers(model).values():
            U = layer.adapter_parameters()["U"]
            U.copy_(torch.randn(U.shape, generator=gen) * 0.3)
        controller = getattr(model, "bem_controller", None)
        for p in controller.parameters() if controller is not None else ():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _end_early(model, tokenizer, episodes):
    """Make end tokens of tokens that one row alone emits early in its first reply, so that a few rows end early and
    the others run to their limits (a random model hardly ever emits <|im_end|>)."""
    model.generation_config.eos_token_id = 2
    rows = [r.tokens[0] for r in rollout(model, tokenizer, episodes, max_new_tokens=12)]
    rows_with = Counter(t for row in rows for t in set(row))
    ends = [next(t for t in row[2:] if rows_with[t] == 1) for row in rows if any(rows_with[t] == 1 for t in row[2:])]
    model.generation_config.eos_token_id = [2, *ends[:2]]
    return model.generation_config.eos_token_id


def _episodes(root):
    return mixed_stream("test", 4, root=root) + composite_items("test", 5, root=root)


def _conversation(tokenizer, rollout_, episode, eos):
    """Prompt 1, reply 1 as fed (an end token is replaced by the template's own end of turn), the next turn."""
    reply = list(rollout_.tokens[0])
    fed = reply[:-1] + ([] if reply[-1] in eos else reply[-1:])
    return prompt_ids(tokenizer, episode.parts[0].prompt) + fed + turn_ids(tokenizer, [p.prompt for p in episode.parts])


def _check_varied(rollouts, episodes, eos):
    """The batch holds rows that ended with an end token, rows cut at their limit, one- and two-part rows, and
    next turns of different lengths (padded in their multi-token call)."""
    ended = [r.tokens[0][-1] in eos for r in rollouts]
    assert any(ended) and not all(ended)
    assert len({len(r.tokens[0]) for r in rollouts}) >= 3
    assert {len(ep.parts) for ep in episodes} == {1, 2}
    two = [(r, ep) for r, ep in zip(rollouts, episodes) if len(ep.parts) == 2]
    assert len({r.spans[1][0] - r.spans[0][1] for r, _ in two}) > 1  # next-turn lengths differ


def test_rollout_part_one_equals_generate_whatever_the_batch(tokenizer, root):
    model = _tiny_bem(tokenizer, "static")
    episodes = _episodes(root)
    eos = _end_early(model, tokenizer, episodes)
    expected = {}
    for task in ROUTER_TASKS:
        eps = [ep for ep in episodes if ep.parts[0].task == task]
        replies = generate(model, tokenizer, [ep.parts[0].prompt for ep in eps], SPECS[task].max_new_tokens)
        expected.update({ep.id: reply for ep, reply in zip(eps, replies)})
    for batch_size in (1, 3, 16):
        rollouts = rollout(model, tokenizer, episodes, batch_size=batch_size)
        assert [r.id for r in rollouts] == [ep.id for ep in episodes]
        assert {r.id: r.replies[0] for r in rollouts} == expected
        assert sorted((r.batch, r.row) for r in rollouts) == [(i // batch_size, i % batch_size)
                                                              for i in range(len(episodes))]
    _check_varied(rollouts, episodes, set(eos))
    assert all(len(r.tokens[0]) == SPECS[ep.parts[0].task].max_new_tokens for r, ep in zip(rollouts, episodes)
               if r.tokens[0][-1] not in eos)


def test_rollout_part_two_equals_greedy_on_the_whole_conversation(tokenizer, root):
    model = _tiny_bem(tokenizer, "static")
    episodes = _episodes(root)
    eos = _end_early(model, tokenizer, episodes)
    rollouts = rollout(model, tokenizer, episodes, batch_size=16)  # one batch: every kind of row together
    _check_varied(rollouts, episodes, set(eos))
    for r, ep in zip(rollouts, episodes):
        start = prompt_ids(tokenizer, ep.parts[0].prompt)
        assert r.spans[0] == (len(start), len(start) + len(r.tokens[0])) and r.ids[:len(start)] == tuple(start)
        if len(ep.parts) == 1:
            assert len(r.ids) == r.spans[0][1]  # a one-part row was fed nothing after its reply
            continue
        conversation = _conversation(tokenizer, r, ep, eos)
        assert r.ids[:r.spans[1][0]] == tuple(conversation)
        assert r.ids[r.spans[1][0]:r.spans[1][1]] == r.tokens[1]
        alone = greedy(model, torch.tensor([conversation]), torch.ones(1, len(conversation), dtype=torch.long),
                       SPECS[ep.parts[1].task].max_new_tokens, eos)[0]
        assert tuple(alone) == r.tokens[1]
        assert r.replies[1] == tokenizer.decode(alone, skip_special_tokens=True)
        assert r.n_tokens == len(r.tokens[0]) + len(r.tokens[1])


def test_routed_rollout_rows_equal_each_episode_alone(tokenizer, root):
    model = _tiny_bem(tokenizer, "chunk")
    episodes = _episodes(root)
    eos = _end_early(model, tokenizer, episodes)
    runtime = model._bem_runtime
    runtime.switches = 0
    batched = rollout(model, tokenizer, episodes, batch_size=16)
    assert runtime.switches > 0  # chunk codes did change inside the stream
    _check_varied(batched, episodes, set(eos))
    for r, ep in zip(batched, episodes):
        (alone,) = rollout(model, tokenizer, [ep], batch_size=1)
        assert (alone.tokens, alone.spans, alone.ids) == (r.tokens, r.spans, r.ids)
        if len(ep.parts) == 2:  # and one forward over the whole conversation routes it as the stream did
            conversation = _conversation(tokenizer, r, ep, eos)
            full = greedy(model, torch.tensor([conversation]), torch.ones(1, len(conversation), dtype=torch.long),
                          SPECS[ep.parts[1].task].max_new_tokens, eos,
                          bem_prompt_len=torch.tensor([r.spans[0][0]]), bem_side=torch.tensor([ep.side]))[0]
            assert tuple(full) == r.tokens[1]
    with bem_disabled(model):  # the routed module changes the replies
        assert [r.tokens for r in rollout(model, tokenizer, episodes)] != [r.tokens for r in batched]


def test_rollout_on_smollm2_matches_plain_greedy(root):
    from bem.models import load_base

    model, tokenizer = load_base("smollm2-135m")
    episodes = composite_items("test", 2, root=root)  # a verse (cut at 10 tokens) and a question (ends at 8)
    eos = {model.generation_config.eos_token_id}
    rollouts = rollout(model, tokenizer, episodes, max_new_tokens=10)
    assert [r.replies[0] for r in rollouts] == generate(model, tokenizer, [ep.parts[0].prompt for ep in episodes], 10)
    assert sorted((r.tokens[0][-1] in eos, len(r.tokens[0]) < 10) for r in rollouts) == [(False, False), (True, True)]
    conversations = [_conversation(tokenizer, r, ep, eos) for r, ep in zip(rollouts, episodes)]
    width = max(map(len, conversations))  # fed as fresh prompts, left-padded
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in conversations])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in conversations])
    assert [tuple(t) for t in greedy(model, ids, mask, 10, list(eos))] == [r.tokens[1] for r in rollouts]


# --- rewards ---------------------------------------------------------------------------------------------------------
def _real_items(root):
    qa = QA["test"][0]
    bible = json.loads((root / "bible_translate" / "test.jsonl").read_text().splitlines()[0])
    define, as_json = _entries(WORDS["test"][:1])
    return {"wordnet_qa": qa, "bible_translate": bible, "wordnet_define": define[0], "json_format": as_json[0]}


def test_part_scores_are_the_tasks_own_metrics(root):
    items = _real_items(root)
    right = {"wordnet_qa": "The answer is curd.", "bible_translate": items["bible_translate"]["target"],
             "wordnet_define": items["wordnet_define"]["target"],
             "json_format": "```json\n" + json.dumps(items["json_format"]["target"]) + "\n```"}
    wrong = {"wordnet_qa": "cheese", "bible_translate": "In the beginning God created the heavens.",
             "wordnet_define": "a large body of water", "json_format": '{"word": "death", "pos": "verb"}'}
    for task, item in items.items():
        assert part_score(task, right[task], item) == 1.0
        assert 0.0 <= part_score(task, wrong[task], item) < 1.0
        for reply in (right[task], wrong[task]):
            scores = SPECS[task].score(reply, item)
            if task == "wordnet_qa":
                expected = scores["f1"]
            elif task == "json_format":
                expected = (scores["json_valid"] + scores["field_em"]) / 2
            else:
                expected = scores["chrf"] / 100
            assert part_score(task, reply, item) == pytest.approx(expected)
    # not the reference's keys (invalid); fields right: word, and synonyms (absent, as the reference's empty list)
    assert part_score("json_format", wrong["json_format"], items["json_format"]) == pytest.approx((0.0 + 2 / 5) / 2)


def test_reward_is_the_mean_part_score_minus_the_switch_cost(root):
    items = _real_items(root)
    episode = Episode("composite", (Part("bible_translate", items["bible_translate"], "p1", (0.0,) * 5),
                                    Part("json_format", items["json_format"], "p2", (0.0,) * 5)))
    replies = ("In the beginning God created the heavens.", json.dumps(items["json_format"]["target"]))
    done = Rollout("composite", replies, ((1,), (2,)), ((0, 1), (2, 3)), (0, 1, 2), batch=0, row=0)
    mean = (part_score("bible_translate", replies[0], items["bible_translate"]) + 1.0) / 2
    assert reward(done, episode, switches=0, lam=0.1) == pytest.approx(mean)
    assert reward(done, episode, switches=2, lam=0.1) == pytest.approx(mean - 0.2)
    with pytest.raises(ValueError, match="is not of episode"):
        reward(done, Episode("other", episode.parts), 0, 0.1)


# --- errors ----------------------------------------------------------------------------------------------------------
def test_errors_name_the_argument_the_value_and_what_is_allowed(root, tokenizer):
    with pytest.raises(ValueError, match=r"split = 'val' is not allowed; expected one of \('train', 'dev', 'test'\)"):
        mixed_stream("val", 4, root=root)
    with pytest.raises(ValueError, match="split = 'val'"):
        composite_items("val", 4, root=root)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=rf"n = {bad!r} is not allowed; expected an integer >= 1"):
            mixed_stream("test", bad, root=root)
        with pytest.raises(ValueError, match=rf"n = {bad!r}"):
            composite_items("test", bad, root=root)
    with pytest.raises(ValueError, match=r"task = 'easy_vqa' is not a router task; expected one of \('wordnet_qa'"):
        part_score("easy_vqa", "yes", {"answer": "yes"})
    vqa = Episode("vqa", (Part("easy_vqa", {"answer": "yes"}, "Is it red?", (0.0,) * 5),))
    model = tiny("llama", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="episode 'vqa': part 0 has task = 'easy_vqa'.*expected one of"):
        rollout(model, tokenizer, [vqa])
    with pytest.raises(ValueError, match="part 0 has task = 'easy_vqa'"):
        reward(Rollout("vqa", ("yes",), ((1,),), ((0, 1),), (0,), 0, 0), vqa, 0, 0.0)
    with pytest.raises(ValueError, match="batch_size = 0"):
        rollout(model, tokenizer, mixed_stream("test", 1, root=root), batch_size=0)
    attach_bem(model, BEMConfig(rank=4, sites=SITES, controller="chunk", side_dim=3))
    with pytest.raises(ValueError, match="side_dim = 3.*5 wide"):
        rollout(model, tokenizer, mixed_stream("test", 1, root=root))
