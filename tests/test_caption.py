"""The caption stage: the caption map (load, MindEye2 names, ridge fit), a tiny GIT captioner from
``transformers`` (shapes, token budget, determinism, local loading), corpus BLEU, the live decoder's
caption after the prior, the config's on/off rules, the decode message, view and report, and the
phantom world's captions and captioner."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from rtdecoder_client.messages import Message
from rtdecoder_client.payloads import DecodeData, Retrieval
from safetensors.torch import save_file
from test_config_keys import _bank, _beta, _bundle, _config, _Recorder, _with

from rtdecoder.compose import build_live_decoder, load_captioner
from rtdecoder.config import SessionConfig, ViewConfig
from rtdecoder.decode.caption import (
    CAPTION_MAP_NAME,
    CaptionMap,
    GitCaptioner,
    corpus_bleu,
    fit_caption_map,
    load_caption_map,
    load_git_captioner,
    main,
    map_r2,
    tidy_caption,
)
from rtdecoder.decode.protocol import Decoded
from rtdecoder.errors import BundleError
from rtdecoder.phantom import captions as phantom
from rtdecoder.session.decode_worker import DecodeJob, DecodeWorker
from rtdecoder.session.journal import Journal
from rtdecoder.session.report import write_report
from rtdecoder.view.state import ViewState

WORDS = ["a", "close", "wide", "view", "of", "the", "cat", "moon", "'", "s", "upper", "left", "center"]
IN_SHAPE = (4, 16)  # the tiny MindEye2 of test_config_keys predicts 4 x 16 tokens
VISION = (5, 8)  # GIT image tokens: (image_size / patch_size)^2 + 1 = 5, width 8


def _tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def _tiny_git(tokenizer, seed: int = 0):
    """A 2-layer GIT, 32 wide, whose image encoder gives 5 tokens of 8 features."""
    from transformers import GitConfig, GitForCausalLM

    config = GitConfig(
        vision_config={"hidden_size": VISION[1], "intermediate_size": 8, "num_hidden_layers": 0,
                       "num_attention_heads": 1, "image_size": 2, "patch_size": 1},
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GitForCausalLM(config).eval()


def _map(seed: int = 1) -> CaptionMap:
    torch.manual_seed(seed)
    return CaptionMap(IN_SHAPE, VISION).eval()


@pytest.fixture(scope="module")
def git_folder(tmp_path_factory) -> Path:
    """A tiny GIT captioner folder as a lab keeps one: transformers files plus caption_map.safetensors."""
    folder = tmp_path_factory.mktemp("git")
    tokenizer = _tokenizer(folder / "vocab")
    _tiny_git(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _map().save(folder / CAPTION_MAP_NAME)
    return folder


def _tokens(n: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, *IN_SHAPE, generator=torch.Generator().manual_seed(seed))


# --- the caption map ---


def test_caption_map_maps_token_sets_and_round_trips_through_safetensors(tmp_path) -> None:
    caption_map = _map()
    out = caption_map(_tokens())
    assert out.shape == (3, *VISION) and caption_map.in_shape == IN_SHAPE and caption_map.out_shape == VISION
    # separable: mixing the tokens, then mapping each token's features
    x = _tokens()[0]
    expected = (caption_map.token_map.weight @ x + caption_map.token_map.bias[:, None]) @ caption_map.dim_map.weight.T
    torch.testing.assert_close(out[0], expected + caption_map.dim_map.bias, rtol=1e-5, atol=1e-5)
    loaded = load_caption_map(caption_map.save(tmp_path / "map.safetensors"))
    torch.testing.assert_close(loaded(_tokens()), out)
    with pytest.raises(BundleError, match=r"caption map: expected tokens of shape \(B, 4, 16\)"):
        caption_map(torch.zeros(1, 5, 16))


def test_caption_map_reads_mindeye2_names_and_names_the_key_when_wrong(tmp_path) -> None:
    reference = _map()
    names = {"token_map": "linear1", "dim_map": "linear2"}
    state = {f"clip_convert.{names[k.split('.')[0]]}.{k.split('.')[1]}": v.detach().contiguous()
             for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "bigG_to_L.safetensors"))
    torch.testing.assert_close(load_caption_map(tmp_path / "bigG_to_L.safetensors")(_tokens()), reference(_tokens()))
    with pytest.raises(BundleError, match=r"caption.map_path: .*missing.safetensors: no such file"):
        load_caption_map(tmp_path / "missing.safetensors")
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BundleError, match=r"expected tensors token_map.weight.*found weight"):
        load_caption_map(tmp_path / "other.safetensors")


def test_ridge_fit_recovers_a_separable_map_from_paired_tokens() -> None:
    rng = np.random.default_rng(0)
    truth = CaptionMap((6, 10), (7, 5))
    torch.manual_seed(3)
    for parameter in truth.parameters():
        torch.nn.init.normal_(parameter)
    source = rng.normal(size=(200, 6, 10)).astype(np.float32)
    with torch.no_grad():
        target = truth(torch.from_numpy(source)).numpy()
    noisy = target + 0.01 * rng.normal(size=target.shape).astype(np.float32)
    fitted = fit_caption_map(source[:160], noisy[:160], ridge=1e-4, n_iterations=5, batch_size=32)
    assert fitted.in_shape == (6, 10) and fitted.out_shape == (7, 5)
    assert map_r2(fitted, source[160:], target[160:]) > 0.99
    # a map with the token mixing left at its start (no alternation) explains far less
    assert map_r2(fit_caption_map(source[:160], noisy[:160], n_iterations=0), source[160:], target[160:]) < 0.5


def test_fit_map_command_pairs_two_embeddings_files_by_id(tmp_path, capsys) -> None:
    from rtdecoder.embedding.cache import write_embeddings_file

    rng = np.random.default_rng(1)
    truth = _map(seed=4)
    source = rng.normal(size=(40, *IN_SHAPE)).astype(np.float32)
    with torch.no_grad():
        target = truth(torch.from_numpy(source)).numpy()
    ids = [f"img-{i:02d}" for i in range(40)]
    write_embeddings_file(tmp_path / "src.safetensors", ids, source, "bigG", storage_dtype="float32")
    order = rng.permutation(40)  # the target file lists the images in another order
    write_embeddings_file(tmp_path / "tgt.safetensors", [ids[i] for i in order], target[order], "git-vit-l",
                          storage_dtype="float32")
    files = ["--source", str(tmp_path / "src.safetensors"), "--target", str(tmp_path / "tgt.safetensors")]
    assert main(["fit-map", *files, "--out", str(tmp_path / "map.safetensors"), "--ridge", "1e-6"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n_train"] == 36 and report["n_test"] == 4 and report["heldout_r2"] > 0.99
    assert load_caption_map(tmp_path / "map.safetensors").out_shape == VISION


# --- the GIT captioner ---


def test_git_captioner_shapes_token_budget_and_determinism(tmp_path) -> None:
    tokenizer = _tokenizer(tmp_path)
    tokens = _tokens(3)
    for budget, beams in ((1, 1), (6, 1), (6, 3)):
        captioner = GitCaptioner(_tiny_git(tokenizer), tokenizer, _map(), max_new_tokens=budget, num_beams=beams)
        assert captioner.input_shape == IN_SHAPE
        ids = captioner.generate(tokens)
        # the start token, then the budget at most; an untrained greedy GIT runs to its budget
        assert ids.shape[0] == 3 and ids.shape[1] <= 1 + budget and (ids[:, 0] == tokenizer.cls_token_id).all()
        assert beams > 1 or ids.shape[1] == 1 + budget
        captions = captioner.caption(tokens)  # a second run on the same input
        assert captions == [tidy_caption(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        assert len(captions) == 3 and all(len(tokenizer.tokenize(c)) <= budget for c in captions)


def test_git_captioner_checks_the_map_fits_its_image_tokens(tmp_path) -> None:
    tokenizer = _tokenizer(tmp_path)
    with pytest.raises(BundleError, match=r"gives tokens of shape \(6, 8\) but captioner 'git' takes \(5, 8\)"):
        GitCaptioner(_tiny_git(tokenizer), tokenizer, CaptionMap(IN_SHAPE, (6, 8)))


def test_git_captioner_loads_from_a_local_folder_offline(git_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_git_captioner(git_folder, max_new_tokens=6)
    tokenizer = _tokenizer(tmp_path)
    in_memory = GitCaptioner(_tiny_git(tokenizer), tokenizer, _map(), max_new_tokens=6)
    assert torch.equal(loaded.generate(_tokens()), in_memory.generate(_tokens()))
    assert not any(p.numel() for p in loaded.model.git.image_encoder.parameters())  # bypassed: no ViT kept
    with pytest.raises(BundleError, match=r"caption.git_weights_dir: .*no config.json"):
        load_git_captioner(tmp_path / "empty")
    other = tmp_path / "other-map.safetensors"
    CaptionMap((3, 16), VISION).save(other)
    assert load_git_captioner(git_folder, map_path=other).input_shape == (3, 16)


# --- BLEU ---


def test_corpus_bleu_against_hand_counts() -> None:
    assert corpus_bleu(["a close view of the cat"], ["a close view of the cat"]) == 1.0
    # one word missing: n-gram precisions 5/5, 3/4, 2/3, 1/2, and the brevity penalty of 5 words against 6
    hypothesis, reference = "a view of the cat", "a close view of the cat"
    precisions = [5 / 5, 3 / 4, 2 / 3, 1 / 2]
    expected = np.exp(1 - 6 / 5) * np.exp(np.mean(np.log(precisions)))
    assert corpus_bleu([hypothesis], [reference]) == pytest.approx(expected)
    assert corpus_bleu(["the moon"], ["a close view of the cat"]) == 0.0  # no 4-gram at all
    # corpus-level: counts are summed over captions before the precisions are taken
    both = corpus_bleu([hypothesis, reference], [reference, reference])
    assert both == pytest.approx(np.exp(1 - 12 / 11) * np.exp(np.mean(np.log([11 / 11, 8 / 9, 6 / 7, 4 / 5]))))
    # clipping: a repeated word counts as often as the best reference holds it
    assert corpus_bleu(["the the the the"], [["the cat", "the the moon"]], max_n=1) == pytest.approx(2 / 4)


def test_decoded_word_pieces_read_as_a_caption() -> None:
    assert tidy_caption("a close view of the cat ' s  upper left .") == "a close view of the cat's upper left."
    assert tidy_caption("a wide view of the coins ' center") == "a wide view of the coins' center"
    assert tidy_caption("the galaxies '") == "the galaxies'"


# --- the live decoder and its wiring ---


class _CaptionRecorder:
    """A captioner that keeps the tokens it is given."""

    name = "recorder"
    input_shape = IN_SHAPE

    def __init__(self) -> None:
        self.tokens: list[torch.Tensor] = []

    def caption(self, tokens: torch.Tensor) -> list[str]:
        self.tokens.append(tokens.clone())
        return [f"a view of {float(t.sum()):.3f}" for t in tokens]


def test_the_caption_reads_the_prior_sample_the_reconstruction_rendered(tmp_path) -> None:
    bundle = _bundle(tmp_path / "b")
    recorder, captions = _Recorder(), _CaptionRecorder()
    decoder = build_live_decoder(bundle, bundle.config, _bank(), recorder, captioner=captions)
    decoded = decoder.retrieve(_beta(), top_k=2)
    decoder.reconstruct(decoded, seed=7)
    text = decoder.caption(decoded, seed=7)
    torch.testing.assert_close(captions.tokens[0], recorder.tokens[0])  # one prior sample for both
    assert text.startswith("a view of")
    again = decoder.retrieve(_beta(), top_k=2)
    assert decoder.caption(again, seed=7) == text  # deterministic for a seed, with or without the image first
    other = decoder.caption(decoder.retrieve(_beta(), top_k=2), seed=8)
    assert other != text
    plain = build_live_decoder(bundle, bundle.config, _bank(), None)
    assert plain.caption(plain.retrieve(_beta(), top_k=2), seed=7) is None


def test_a_captioner_of_another_token_shape_is_refused(tmp_path, git_folder) -> None:
    bundle = _bundle(tmp_path / "b")
    captioner = load_git_captioner(git_folder, map_path=_wrong_map(tmp_path))
    with pytest.raises(BundleError, match=r"caption.map_path: captioner .* takes tokens of shape \(3, 16\) but the "
                                          r"model of sub-01 predicts \(4, 16\)"):
        build_live_decoder(bundle, bundle.config, _bank(), None, captioner=captioner)


def _wrong_map(tmp_path: Path) -> Path:
    return CaptionMap((3, 16), VISION).save(tmp_path / "wrong.safetensors")


def test_captions_are_off_where_the_weights_are_missing_with_the_key_named(tmp_path, git_folder, caplog) -> None:
    config = _config()
    with caplog.at_level(logging.INFO, logger="rtdecoder.compose"):
        assert load_captioner(_with(config, "caption", enabled=False)) is None
        assert caplog.text == ""
        assert load_captioner(config) is None
        assert "captions off: caption.git_weights_dir is not set" in caplog.text
        caplog.clear()
        assert load_captioner(_with(config, "caption", git_weights_dir=str(tmp_path / "nowhere"))) is None
        assert "caption.git_weights_dir: " in caplog.text and "nowhere holds no GIT model" in caplog.text
        caplog.clear()
        missing_map = _with(config, "caption", git_weights_dir=str(git_folder), map_path=str(tmp_path / "none.st"))
        assert load_captioner(missing_map) is None
        assert "captions off: caption.map_path: " in caplog.text
    captioner = load_captioner(_with(config, "caption", git_weights_dir=str(git_folder), max_new_tokens=3, num_beams=2))
    assert isinstance(captioner, GitCaptioner) and captioner.max_new_tokens == 3 and captioner.num_beams == 2


# --- the decode message, the view and the report ---


class _FakeDecoder:
    def __init__(self, caption: str | Exception | None) -> None:
        self._caption = caption

    def retrieve(self, beta, top_k, shown_id=None) -> Decoded:
        return Decoded(["c0", "c1"], [0.5, 0.2], 1.0, n_candidates=2, shown_rank=1)

    def reconstruct(self, decoded, seed) -> bytes:
        return b"\x89PNG fake"

    def caption(self, decoded, seed) -> str | None:
        if isinstance(self._caption, Exception):
            raise self._caption
        return self._caption


def _decode(decoder, reconstruct: bool = True, backlog: int = 0) -> list[tuple[str, dict]]:
    published: list[tuple[str, dict]] = []

    def publish(topic, data, t):
        published.append((topic, data))
        return Message(topic, "s", len(published) - 1, t, data)

    worker = DecodeWorker(decoder, SessionConfig(reconstruct=reconstruct, max_decode_backlog=1), publish)
    worker._decode_one(DecodeJob("run-01", "t-001", "c0", np.zeros(3, np.float32), 4, {}), backlog=backlog)
    return published


def test_the_decode_message_carries_the_caption() -> None:
    (topic, data), = _decode(_FakeDecoder("a close view of the cat's upper left"))
    assert topic == "decode" and data["caption"] == "a close view of the cat's upper left" and data["caption_ms"] >= 0
    assert DecodeData.from_map(data).caption == data["caption"]
    (_, off), = _decode(_FakeDecoder("a wide view of the moon's center"), reconstruct=False)
    assert off["reconstruction"] == "disabled" and off["caption"] == "a wide view of the moon's center"
    (_, skipped), = _decode(_FakeDecoder("never asked"), backlog=3)
    assert skipped["reconstruction"] == "skipped_backlog" and "caption" not in skipped
    (_, none), = _decode(_FakeDecoder(None))
    assert "caption" not in none and "caption_ms" not in none  # optional fields, left out when None
    (status, error), (_, kept) = _decode(_FakeDecoder(RuntimeError("GIT ran out of memory")))
    assert status == "status" and error["state"] == "decode_error" and "caption: RuntimeError" in error["message"]
    assert kept["reconstruction"] == "done" and "caption" not in kept  # the image still goes out


def _decode_messages(captions: list[str | None]) -> list[Message]:
    messages = []
    for k, caption in enumerate(captions):
        data = DecodeData("run-01", f"t-{k:03d}", "c0", k, Retrieval(["c0", "c1"], [0.5, 0.2], 2, 1), 1.0,
                          reconstruction="done", caption=caption, caption_ms=12.5 if caption else None).to_map()
        messages.append(Message("decode", "s", k, {"published": 100.0 + k}, data))
    return messages


def test_the_view_and_the_report_show_the_caption(tmp_path) -> None:
    state = ViewState(ViewConfig())
    events = [state.take(m)[-1] for m in _decode_messages(["a close view of <b>the cat</b>'s top", None])]
    assert events[0]["caption"] == "a close view of <b>the cat</b>'s top" and events[0]["caption_ms"] == 12.5
    assert events[1]["caption"] is None
    with Journal(tmp_path / "journal.bin", fsync=False) as journal:
        for message in _decode_messages(["a close view of <b>the cat</b>'s top", None]):
            journal.append({"kind": "published", "message": message.to_dict()})
    figures = write_report(tmp_path, "run-01", tmp_path / "report.html", 1.6)
    page = (tmp_path / "report.html").read_text()
    assert figures["captioned"] == 1 and figures["caption_ms_median"] == 12.5
    assert "<td class='caption'>a close view of &lt;b&gt;the cat&lt;/b&gt;&#x27;s top</td>" in page  # escaped
    view_js = (Path(__file__).parents[1] / "rtdecoder/view/static/view.js").read_text()
    assert "t.caption" in view_js and "innerHTML" not in view_js


# --- the phantom world's captions ---


def test_crop_captions_say_subject_scale_and_position() -> None:
    size = (600, 300)  # width, height
    assert phantom.crop_caption("chelsea", 0, 0, 100, size).text == "a close view of the cat's upper left"
    assert phantom.crop_caption("coins", 450, 150, 140, size).text == "a close view of the coins' lower right"
    assert phantom.crop_caption("moon", 225, 50, 180, size).text == "a medium view of the moon's center"
    assert phantom.crop_caption("grace_hopper", 0, 0, 300, size).text == "a wide view of grace hopper's left side"
    for caption in (phantom.crop_caption("coffee", 10, 0, 250, size), phantom.crop_caption("ihc", 350, 40, 110, size)):
        assert phantom.parse_caption(caption.text) == (caption.subject, caption.scale, caption.position)
    assert phantom.parse_caption("a close view of the coffee cup's top") == ("the coffee cup", "close", "top")
    assert phantom.parse_caption("the cat and the moon") == (None, None, None)  # two subjects: none named
    vocabulary = set(phantom.caption_vocabulary())
    assert {"cat", "coffee", "upper", "left", "close", "'", "s"} <= vocabulary


def test_bank_captions_and_metrics_with_chance() -> None:
    from rtdecoder.phantom.stimuli import StimulusBank

    bank = StimulusBank.build(76, size_px=16, seed=0)
    truth = phantom.bank_captions(bank)
    assert len(truth) == 76 and {c.subject for c in truth} == {s for s, _ in phantom.SUBJECTS.values()}
    perfect = phantom.caption_metrics([c.text for c in truth], truth)
    assert perfect == {"n": 76, "subject_accuracy": 1.0, "scale_accuracy": 1.0, "position_accuracy": 1.0,
                       "exact_caption": 1.0, "bleu4": 1.0}
    chance = phantom.chance_metrics(truth)
    assert chance["subject_accuracy"] < 0.2 and chance["bleu4"] < 0.8 and chance["subject_uniform"] == 1 / 18
    wrong_subject = [c.text.replace(c.subject, "the moon" if c.subject != "the moon" else "the cat") for c in truth]
    assert phantom.caption_metrics(wrong_subject, truth)["subject_accuracy"] == 0.0


def test_phantom_captioner_trains_saves_and_loads_as_a_lab_folder(tmp_path) -> None:
    rng = np.random.default_rng(0)
    texts = ["a close view of the cat's upper left", "a wide view of the moon's center"]
    tokens = np.stack([rng.normal(size=(9, 16)) + 3 * k for k in (0, 1)]).astype(np.float32)
    config = _with(_config(), "caption", phantom_train_steps=200, phantom_batch_size=4, phantom_lr=3e-3,
                   phantom_hidden_dim=32)
    model, tokenizer, caption_map, losses = phantom.train_phantom_captioner(tokens, texts, config, progress=False)
    assert caption_map.in_shape == (9, 16) and caption_map.out_shape == (10, 32)  # 3 x 3 + 1 image tokens
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    folder = phantom.save_phantom_captioner(tmp_path / "captioner", model, tokenizer, caption_map, {"key": "test"})
    captioner = load_git_captioner(folder, max_new_tokens=12)
    assert captioner.caption(torch.from_numpy(tokens)) == texts  # two captions learned by heart
    assert json.loads((folder / phantom.RECORD_NAME).read_text())["key"] == "test"


def test_phantom_caption_split_holds_out_the_experiments_test_images() -> None:
    config = _config()
    train, held = phantom.caption_split(config)
    n_test = config.experiment.n_test_images
    assert held.tolist() == list(range(n_test)) and train[0] == n_test
    assert len(train) + n_test == config.phantom.n_stimuli
    assert phantom.phantom_caption_key(config) != phantom.phantom_caption_key(
        _with(config, "caption", phantom_hidden_dim=64))
    assert phantom.phantom_caption_key(config) == phantom.phantom_caption_key(_with(config, "caption", num_beams=3))
