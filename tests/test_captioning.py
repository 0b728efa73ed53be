"""The caption path: metrics (CIDEr-D, BLEU), the decoder and its decoding rules, the caption term (XE and
self-critical training) through the trainer, and ``vsekit caption``."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from _configs import TINY_TWO_LEVEL, tiny_config

from vsekit.checkpoint import load_checkpoint, save_checkpoint
from vsekit.config import resolve_config
from vsekit.data.batch import Batch
from vsekit.data.corpus import Corpus
from vsekit.errors import ConfigError
from vsekit.losses.caption import CaptionTerm, reference_ids
from vsekit.models.decoder import CaptionDecoder, beam_search, greedy_decode
from vsekit.models.vse import PairOutput
from vsekit.text.caption_metrics import CiderD, caption_scores, cider_d, corpus_bleu, index_words
from vsekit.text.vocab import SPECIALS, Vocabulary

L2 = math.log(2.0)


# -- CIDEr-D -----------------------------------------------------------------------------------------------
def test_cider_d_by_hand_on_tiny_references():
    a, b, c, d, e = range(10, 15)
    # two images (N = 2): image 0 has references "a b" and "a c", image 1 has "c d". Document frequencies:
    # c appears in both images (idf = log 2 - log 2 = 0), every other n-gram in one (idf = log 2 - log 1).
    scorer = CiderD([[[a, b], [a, c]], [[c, d]]])
    # candidate "a b" for image 0.
    #   vs "a b": identical tf-idf vectors for n = 1, 2 -> sim 1, 1; no 3- or 4-grams -> 0, 0; mean 0.5
    #   vs "a c": unigrams {a: L2, b: L2} . {a: L2, c: 0} = L2^2, norms sqrt(2) L2 and L2 -> 1/sqrt(2);
    #             bigrams share nothing -> 0; mean (1/sqrt(2)) / 4
    #   equal lengths (penalty 1); 10 x the mean over the two references
    want = 10 * (0.5 + 1 / (4 * math.sqrt(2))) / 2
    got = scorer.score_documents([[a, b]], [0])
    assert abs(got[0] - want) < 1e-12 and abs(want - 3.3838834764831844) < 1e-12
    # an exact match of a two-word caption scores 5, not 10: its 3- and 4-gram similarities are 0
    assert abs(CiderD([[[a, b]], [[c, d]]]).score_documents([[a, b]], [0])[0] - 5.0) < 1e-12
    # "a" against "a b" (images "a b" | "c d"): sim_1 = L2^2 / (L2 * sqrt(2) L2) = 1/sqrt(2), length penalty
    # exp(-(1 - 2)^2 / (2 * 6^2)) = exp(-1/72)
    two = CiderD([[[a, b]], [[c, d]]])
    assert abs(two.score_documents([[a]], [0])[0] - 10 * (1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)) < 1e-12
    # clipping: "a a" has tf-idf 2 L2 for a, clipped to the reference's L2: (L2 * L2) / (2 L2 * sqrt(2) L2)
    assert abs(two.score_documents([[a, a]], [0])[0] - 10 * (1 / (2 * math.sqrt(2))) / 4) < 1e-12
    # a word no reference has (df 0 -> idf log 2) still counts in the candidate's norm
    assert abs(two.score_documents([[a, e]], [0])[0] - 10 * (1 / 2) / 4) < 1e-12
    # an n-gram in every image has idf 0: it earns nothing
    assert CiderD([[[a, b]], [[a, d]]]).score_documents([[a]], [0])[0] == 0.0
    # score() with explicit references uses the same document frequencies
    np.testing.assert_allclose(scorer.score([[a, b], [c]], [[[a, b], [a, c]], [[c, d]]]),
                               scorer.score_documents([[a, b], [c]], [0, 1]), atol=1e-12)


def _random_captions(seed: int, n: int):
    rng = random.Random(seed)
    words = "a the red blue circle square big small on left right of to is".split()

    def sentence():
        return [rng.choice(words) for _ in range(rng.randint(1, 9))]

    return [sentence() for _ in range(n)], [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_and_bleu_agree_with_pycocoevalcap(seed):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = _random_captions(seed, 7)
    gts = {i: [" ".join(r) for r in refs[i]] for i in range(len(cands))}
    res = {i: [" ".join(cands[i])] for i in range(len(cands))}
    want_mean, want = Cider().compute_score(gts, res)
    (cand_ids, ref_ids), _ = index_words(cands, refs)
    mean, per = cider_d(cand_ids, ref_ids)
    np.testing.assert_allclose(per, want, atol=1e-10)
    assert abs(mean - want_mean) < 1e-10
    bleu_want, _ = Bleu(4).compute_score(gts, res, verbose=0)
    bleu = corpus_bleu(cands, refs)
    for k in range(4):  # pycocoevalcap adds 1e-15 to a zero count; we report 0
        assert abs(bleu[k] - bleu_want[k]) < (1e-3 if bleu[k] == 0 else 1e-9)


def test_corpus_bleu_by_hand():
    a, b, c, d, e, f, g = "abcdefg"
    cands = [[a, b, c, d], [a, b, c, e, f]]
    refs = [[[a, b, c, e], [a, b]], [[a, b, c, e, f, g]]]
    # clipped matches / candidate n-grams, summed over both candidates:
    #   1-grams (3 + 5) / (4 + 5), 2-grams (2 + 4) / (3 + 4), 3-grams (1 + 3) / (2 + 3), 4-grams (0 + 2) / (1 + 2)
    # lengths: candidates 4 + 5 = 9; closest references 4 (of 4 and 2) + 6 = 10 -> brevity exp(1 - 10/9)
    p = [8 / 9, 6 / 7, 4 / 5, 2 / 3]
    bp = math.exp(1 - 10 / 9)
    bleu = corpus_bleu(cands, refs)
    for k in range(4):
        assert abs(bleu[k] - bp * math.prod(p[: k + 1]) ** (1 / (k + 1))) < 1e-12
    assert abs(bleu[3] - 0.7144468265841447) < 1e-12
    assert corpus_bleu([[a, a, a]], [[[a, b]]])[0] == pytest.approx(1 / 3)  # a counts once: the reference has one
    # closest reference length, the shorter on a tie: 3 words vs references of 2 and 4 -> r = 2, no penalty
    assert corpus_bleu([[a, b, c]], [[[a, b], [a, b, c, d]]])[0] == 1.0
    assert corpus_bleu([[a, b]], [[[c, d]]]) == [0.0, 0.0, 0.0, 0.0]


def test_caption_scores_tokenise_strings():
    s = caption_scores(["A red circle.", "two stars"], [["a red circle .", "a red disc"], ["two yellow stars"]])
    assert s["bleu1"] > 0 and 0 < s["cider_d"] and set(s) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider_d"}


def test_references_keep_out_of_vocabulary_words_apart():
    vocab = Vocabulary(list(SPECIALS) + ["a", "b"])
    docs = reference_ids(["a zebra", "zebra b yak"], np.array([0, 1]), 2, vocab)
    assert docs == [[[4, 6]], [[6, 5, 7]]]  # zebra and yak get ids of their own, never <unk> (3)


# -- decoding ----------------------------------------------------------------------------------------------
PAD, START, END, A, B = 0, 1, 2, 3, 4


def _markov(table: dict[int, dict[int, float]], v: int = 5):
    """A toy model whose next-word distribution depends on the previous word only."""
    logp = torch.full((v, v), float("-inf"))
    for prev, nxt in table.items():
        for w, p in nxt.items():
            logp[prev, w] = math.log(p)

    def step(words, state):
        return logp[words], state

    return step


# greedy takes a (0.6) and then end (0.4): 0.24; "b end" has 0.4 * 0.9 = 0.36
GREEDY_TRAP = {START: {A: 0.6, B: 0.4}, A: {END: 0.4, A: 0.3, B: 0.3}, B: {END: 0.9, A: 0.05, B: 0.05},
               PAD: {END: 1.0}}
IDS = {"start_id": START, "end_id": END, "pad_id": PAD}


def test_beam_search_beats_greedy_where_greedy_is_trapped():
    step = _markov(GREEDY_TRAP)
    g = greedy_decode(step, {}, 1, max_len=4, **IDS)
    b = beam_search(step, {}, 1, beam_size=2, max_len=4, **IDS)
    assert g.tokens.tolist() == [[A, END]] and abs(float(g.sequence_logprob()) - math.log(0.24)) < 1e-6
    assert b.tokens.tolist() == [[B, END]] and abs(float(b.sequence_logprob()) - math.log(0.36)) < 1e-6


def test_decoding_stops_at_the_end_token_and_respects_max_len():
    ends = _markov({START: {A: 1.0}, A: {B: 1.0}, B: {END: 1.0}, END: {A: 1.0}, PAD: {A: 1.0}})
    never = _markov({START: {A: 1.0}, A: {A: 1.0}, PAD: {A: 1.0}})
    for decode in (greedy_decode, lambda *a, **k: beam_search(*a, beam_size=3, **k)):
        d = decode(ends, {}, 2, max_len=10, **IDS)
        assert d.tokens.tolist() == [[A, B, END]] * 2 and d.lengths.tolist() == [3, 3]
        d = decode(ends, {}, 1, max_len=2, **IDS)
        assert d.tokens.tolist() == [[A, B]] and d.words(END) == [[A, B]]
        d = decode(never, {}, 1, max_len=5, **IDS)
        assert d.tokens.tolist() == [[A] * 5]
    # in a batch, a sequence that ended is padded while the others go on
    mixed = greedy_decode(lambda w, s: (torch.where(s["stop"][:, None], ends(w, s)[0], never(w, s)[0]), s),
                          {"stop": torch.tensor([True, False])}, 2, max_len=4, **IDS)
    assert mixed.tokens.tolist() == [[A, B, END, PAD], [A, A, A, A]] and mixed.lengths.tolist() == [3, 4]


def _decoder(seed: int = 0, **kw) -> CaptionDecoder:
    torch.manual_seed(seed)
    return CaptionDecoder(vocab_size=5, image_dim=4, hidden=6, word_dim=3, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"cell": "gru", "inject": "both"}, {"context_dim": 4, "inject": "step"}])
def test_greedy_equals_beam_of_one_and_exhaustive_beam_finds_the_best_sequence(kw):
    dec = _decoder(1, **kw)
    g = torch.Generator().manual_seed(2)
    img = torch.randn(3, 4, generator=g)
    ctx = torch.randn(3, 2, 4, generator=g) if "context_dim" in kw else None
    with torch.no_grad():
        greedy = dec.greedy(img, ctx, max_len=4)
    one = dec.beam(img, ctx, beam_size=1, max_len=4)
    assert torch.equal(greedy.tokens, one.tokens)
    torch.testing.assert_close(greedy.sequence_logprob(), one.sequence_logprob())
    # every sequence of at most 3 tokens over {a, b, end}: 2^3 open + 4 + 2 + 1 ended hypotheses at the last
    # step, so 16 beams are exhaustive
    best = dec.beam(img, ctx, beam_size=16, max_len=3)
    mean = dec.beam(img, ctx, beam_size=16, max_len=3, length_norm=1.0)
    seqs = [list(s[:k]) + [END] for k in range(3) for s in itertools.product([A, B], repeat=k)]
    seqs += [list(s) for s in itertools.product([A, B, END], repeat=3) if END not in s[:2]]
    seqs = [s[: s.index(END) + 1] if END in s else s for s in seqs]
    with torch.no_grad():
        for i in range(3):
            scored = []
            for s in {tuple(s) for s in seqs}:
                tokens = torch.tensor([[START, *s]])
                lp = dec(img[i: i + 1], tokens, None if ctx is None else ctx[i: i + 1])
                scored.append((float(lp[0].gather(1, tokens[0, 1:, None]).sum()), s))
            top, top_seq = max(scored)
            assert abs(float(best.sequence_logprob()[i]) - top) < 1e-5
            assert tuple(t for t in best.tokens[i].tolist() if t != PAD) == top_seq
            assert float(best.sequence_logprob()[i]) >= float(greedy.sequence_logprob()[i]) - 1e-6
            top_mean = max(s / len(q) for s, q in scored)
            got = float(mean.sequence_logprob()[i]) / int(mean.lengths[i])
            assert abs(got - top_mean) < 1e-5


def test_sampled_log_probabilities_are_the_teacher_forced_ones_up_to_the_end_token():
    dec = _decoder(3)
    img = torch.randn(6, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        s = dec.sample(img, max_len=6)
        for i in range(6):
            words = [t for t, m in zip(s.tokens[i].tolist(), s.mask[i].tolist()) if m]
            tokens = torch.tensor([[START, *words]])
            lp = dec(img[i: i + 1], tokens).gather(2, tokens[:, 1:, None]).sum()
            assert abs(float(lp) - float(s.sequence_logprob()[i])) < 1e-5
            assert PAD not in words and START not in words and (END not in words[:-1])


# -- the caption term ------------------------------------------------------------------------------------
VOCAB = Vocabulary(list(SPECIALS) + ["a", "b", "c", "d"])


def _corpus() -> Corpus:
    return Corpus("toy", ["a b", "a b c", "c d", "d d"], np.array([0, 0, 1, 1]), ["0", "1"],
                  features=np.zeros((2, 3), dtype=np.float32))


def _out(image: torch.Tensor, context: torch.Tensor | None = None) -> PairOutput:
    z = torch.zeros(image.shape[0], image.shape[0])
    return PairOutput(image, image, z, image, image, image_context=context)


def _tokens(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [VOCAB.encode(c) for c in captions]
    t = max(map(len, seqs))
    return torch.tensor([s + [0] * (t - len(s)) for s in seqs]), torch.tensor([len(s) for s in seqs])


@pytest.mark.parametrize("options", [{"condition": "low"},
                                     {"condition": "context", "attention": True, "cell": "gru"}])
def test_cross_entropy_falls_on_a_memorised_batch(options):
    torch.manual_seed(0)
    term = CaptionTerm(embed_size=4, vocab=VOCAB, hidden=16, word_dim=8, **options)
    image = torch.randn(4, 8)  # [high | low], 4 each
    context = torch.randn(4, 3, 4) if options["condition"] == "context" else None
    text = _tokens(["a b", "c d d", "b a c", "d"])
    batch = Batch(image, text, torch.arange(4))
    opt = torch.optim.Adam(term.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        loss = term(_out(image, context), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    # it learnt the captions: greedy decoding gives them back
    vec, ctx = term.image_inputs(image, image, context)
    words = term.decoder.eval().greedy(vec, ctx, max_len=6).words(VOCAB.end_id)
    assert [VOCAB.decode(w) for w in words] == ["a b", "c d d", "b a c", "d"]


def test_the_image_vector_and_its_gradient():
    term = CaptionTerm(embed_size=4, vocab=VOCAB, hidden=8, word_dim=4)
    image = torch.randn(2, 8, requires_grad=True)
    batch = Batch(image, _tokens(["a b", "c"]), torch.arange(2))
    term(_out(image), batch).backward()
    assert image.grad[:, :4].abs().sum() == 0 and image.grad[:, 4:].abs().sum() > 0  # v_l only, into the encoder
    frozen = CaptionTerm(embed_size=4, vocab=VOCAB, hidden=8, word_dim=4, detach_image=True)
    image.grad = None
    frozen(_out(image), batch).backward()
    assert image.grad is None and frozen.decoder.out.weight.grad is not None
    with pytest.raises(ConfigError, match="condition: 'low' reads the grounded half"):
        term(_out(torch.randn(2, 4)), batch)
    with pytest.raises(ConfigError, match="set image_dim: 8"):
        CaptionTerm(embed_size=4, vocab=VOCAB, condition="embedding")(_out(image), batch)
    with pytest.raises(ConfigError, match="needs an image encoder that returns regions"):
        CaptionTerm(embed_size=4, vocab=VOCAB, condition="context")(_out(image), batch)


@pytest.mark.parametrize("better", [True, False])
def test_self_critical_step_raises_a_sample_that_beats_the_greedy_baseline(better, monkeypatch):
    torch.manual_seed(4)
    term = CaptionTerm(embed_size=4, vocab=VOCAB, corpus=_corpus(), condition="embedding", hidden=8, word_dim=4,
                       max_len=5, mode="scst")
    image = torch.randn(1, 4)
    drawn = []
    sample = term.decoder.sample

    def recording(*a, **k):
        d = sample(*a, **k)
        drawn.append(d)
        return d

    monkeypatch.setattr(term.decoder, "sample", recording)
    rewards = iter([torch.tensor([0.5]), torch.tensor([1.0 if better else 0.0])])  # greedy first, then sample
    monkeypatch.setattr(term, "rewards", lambda decoded, rows: next(rewards))
    loss, extra = term(_out(image), Batch(image, (), torch.tensor([0])))
    assert float(extra["scst_reward"]) == (1.0 if better else 0.0) and float(extra["scst_greedy_reward"]) == 0.5
    words = [t for t, m in zip(drawn[0].tokens[0].tolist(), drawn[0].mask[0].tolist()) if m]
    tokens = torch.tensor([[START, *words]])

    def logp() -> float:
        with torch.no_grad():
            return float(term.decoder(image, tokens).gather(2, tokens[:, 1:, None]).sum())

    before = logp()
    assert abs(loss.item() + ((0.5 if better else -0.5) * before)) < 1e-5  # -(r_s - r_g) * sum log p
    opt = torch.optim.SGD(term.parameters(), lr=0.05)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert (logp() > before) if better else (logp() < before)


def test_self_critical_baseline_and_samples_read_the_same_standardised_image():
    """With image_norm: batch the greedy baseline (eval mode) read the running statistics and the samples the
    batch's: the advantage compared captions of two different inputs (issue 25)."""
    torch.manual_seed(0)
    term = CaptionTerm(embed_size=4, vocab=VOCAB, corpus=_corpus(), condition="embedding", hidden=8, word_dim=4,
                       max_len=5, mode="scst", scst_samples=2, image_norm="batch")
    term.decoder.image_norm.running_mean.fill_(100.0)  # far from this batch's statistics
    seen = []
    term.decoder.init_state.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    image = torch.randn(3, 4)
    term.train()(_out(image), Batch(image, (), torch.tensor([0, 1, 0])))
    greedy_input, sample_input = seen
    torch.testing.assert_close(sample_input, greedy_input.repeat_interleave(2, 0))
    torch.testing.assert_close(greedy_input.mean(0), torch.zeros(4), atol=1e-5, rtol=0)  # the batch's statistics


def test_self_critical_rewards_are_cider_d_against_all_training_references():
    term = CaptionTerm(embed_size=4, vocab=VOCAB, corpus=_corpus(), condition="embedding", hidden=8, word_dim=4,
                       mode="scst", scst_samples=3)
    torch.manual_seed(0)
    image = torch.randn(2, 4)
    loss, extra = term(_out(image), Batch(image, (), torch.tensor([1, 0])))
    assert loss.requires_grad and {"scst_reward", "scst_greedy_reward"} == set(extra)
    decoded = term.decoder.greedy(image, max_len=5)
    refs = [[[4, 5], [4, 5, 6]], [[6, 7], [7, 7]]]  # ids: a 4, b 5, c 6, d 7
    want = CiderD(refs).score_documents(decoded.words(VOCAB.end_id), [1, 0])
    np.testing.assert_allclose(term.rewards(decoded, torch.tensor([1, 0])).numpy(), want, rtol=1e-6)
    # a caption equal to a reference of image 0 earns more against image 0's references than image 1's
    r = term.reward.score_documents([[4, 5], [4, 5]], [0, 1])
    assert r[0] > r[1] == 0.0


def test_a_term_without_the_corpus_cannot_train_self_critically():
    term = CaptionTerm(embed_size=4, vocab=VOCAB, condition="embedding", mode="scst")
    with pytest.raises(ConfigError, match="scst needs the training corpus"):
        term(_out(torch.randn(1, 4)), Batch(torch.zeros(1), (), torch.tensor([0])))


# -- through the trainer, and the command line ------------------------------------------------------------
def _cfg(out, *extra):
    return tiny_config(
        out, "seed=5", "data.num_images=80", "data.regions=grid",
        "data.val_max_images=16", "model.embed_size=8", "model.use_abs=true",
        "model.similarity=two_level_order", "model.image_encoder={name: two_level, encoder: {name: precomp}}",
        "model.text_encoder={name: two_level, encoder: {name: gru, word_dim: 6}}",
        "train.batch_size=16", "train.max_steps_per_epoch=3", "optim.lr=1e-3",
        "eval.chunk_size=8", "objective.terms.caption={weight: 0, hidden: 16, word_dim: 8, max_len: 12}", *extra)


STAGES = ("train.epochs=3",
          "train.stages=[{name: look, epochs: 1}, {name: xe, epochs: 1, objective: {terms: {caption: {weight: 1}}}},"
          "{name: scst, epochs: 1, objective: {terms: {caption: {weight: 1, mode: scst, scst_samples: 2}}}}]")


def test_cross_entropy_then_self_critical_stages_resume_bit_exactly(tmp_path, cache):
    from vsekit.train.trainer import Trainer

    full = Trainer(_cfg(tmp_path / "a", *STAGES))
    full.fit()
    term = full.objective.terms["caption"]
    assert term.mode == "scst" and {"caption", "scst_reward", "scst_greedy_reward"} <= set(full.last_parts)
    Trainer(_cfg(tmp_path / "b", *STAGES[1:], "train.epochs=2")).fit()  # "killed" after the XE stage
    resumed = Trainer(_cfg(tmp_path / "b", *STAGES), resume=True)
    assert resumed.objective.terms["caption"].mode == "xe"
    resumed.fit()
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert any(k.startswith("caption.decoder.") for k in a["objective"])
    for part in ("model", "objective"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    with pytest.raises(ConfigError, match="objective.terms.caption.conditon"):
        _cfg(tmp_path / "c", "objective.terms.caption.conditon=low")
    with pytest.raises(ConfigError, match="objective.terms.caption.hidden: cannot change between training stages"):
        Trainer(_cfg(tmp_path / "d", "train.epochs=2", "train.stages=[{epochs: 1, objective: {terms: {caption: "
                     "{weight: 1}}}}, {epochs: 1, objective: {terms: {caption: {weight: 1, hidden: 4}}}}]")).fit()


def test_vsekit_caption_prints_one_caption_per_image(tmp_path, cache, capsys):
    from vsekit.cli import main
    from vsekit.data.sources import data_config, load_split
    from vsekit.train.trainer import Trainer

    out = tmp_path / "run"
    Trainer(tiny_config(
        out, *TINY_TWO_LEVEL, "objective.terms.caption={weight: 1, hidden: 8, word_dim: 4, max_len: 6}")).fit()
    test = load_split(data_config({"format": "demo", "num_images": 60}), "test")
    paths = [str(p) for p in test.image_paths[:3]]
    capsys.readouterr()
    assert main(["caption", str(out), *paths, "--beam", "2", "--max-len", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("\t")[0] for ln in lines] == paths
    assert all(len(ln.split("\t")) == 2 and len(ln.split("\t")[1].split()) <= 5 for ln in lines)
    assert main(["caption", str(out), "--data", "demo", "--split", "test", "--rows", "1,0"]) == 0
    assert [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines()] == [test.image_ids[1],
                                                                                        test.image_ids[0]]
    assert main(["caption", str(out), "--eval", "--split", "test", "--out", str(tmp_path / "s.json")]) == 0
    assert "CIDEr-D" in capsys.readouterr().out and (tmp_path / "s.json").is_file()

    # a checkpoint whose run had no caption term: a one-line error, exit code 2
    state = load_checkpoint(out / "last.pt")
    state["config"]["objective"]["terms"] = {}
    state["objective"] = {k: v for k, v in state["objective"].items() if not k.startswith("caption.")}
    save_checkpoint(tmp_path / "plain.pt", state)
    assert main(["caption", str(tmp_path / "plain.pt"), *paths]) == 2
    assert "has no caption decoder" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["gxn_demo", "gxn_f30k", "gxn_coco"])
def test_gxn_recipes_switch_the_caption_term_from_xe_to_scst_with_ranking_throughout(recipe):
    from vsekit.cli.common import recipe_path
    from vsekit.config.resolve import stage_configs

    cfg = resolve_config(recipe_path(recipe), [])
    stages = stage_configs(cfg)
    assert [s.name for s in cfg.train.stages] == ["look_match", "imagine_xe", "imagine_scst"]
    assert sum(s.epochs for s in cfg.train.stages) == cfg.train.epochs
    terms = [s.objective.terms for s in stages]
    assert [t["level_ranking"]["weight"] for t in terms] == [1.0, 1.0, 1.0]
    assert [t["caption"]["weight"] for t in terms] == [0.0, 1.0, 1.0]
    assert [t["caption"].get("mode", "xe") for t in terms[1:]] == ["xe", "scst"]
    assert terms[1]["caption"]["condition"] == "low"
