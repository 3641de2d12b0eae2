"""Incremental detokenization: partial UTF-8, stop strings held back and cut, stop tokens, EOS, length."""
from paged_fakes import EOS_ID, ByteTokenizer

from pagedeploy.runtime.detokenizer import Detokenizer, releasable_text_end
from pagedeploy.runtime.sampling_params import SamplingParams
from pagedeploy.runtime.sequence import Sequence

PROMPT = list("Q: ".encode())


def feed(text_or_ids, params: SamplingParams, max_model_len: int = 1000) -> tuple[Sequence, list[str]]:
    """Feed tokens one by one; returns the sequence and the text released after each token."""
    ids = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else list(text_or_ids)
    seq = Sequence(0, list(PROMPT), len(PROMPT), params)
    detok = Detokenizer(ByteTokenizer(), {EOS_ID}, max_model_len)
    released = []
    for t in ids:
        seq.append_token(t)
        detok.process(seq, t)
        end = releasable_text_end(seq)
        released.append(seq.text[seq.num_emitted_chars:end])
        seq.num_emitted_chars = end
        if seq.finish_reason:
            break
    return seq, released


def test_multibyte_characters_are_released_only_when_complete():
    text = "héllo € 😀!"
    seq, released = feed(text, SamplingParams(max_tokens=100))
    assert "".join(released) == text
    assert all("\ufffd" not in r for r in released)
    euro = text.encode().index("€".encode())
    assert released[euro:euro + 3] == ["", "", "€"]    # three bytes, one character


def test_stop_string_is_cut_and_never_released():
    seq, released = feed("Hello, World! More", SamplingParams(stop=["World"], max_tokens=100))
    assert seq.finish_reason == "stop" and seq.stop_reason == "World"
    assert "".join(released) == "Hello, "
    assert seq.text == "Hello, "


def test_possible_stop_prefix_is_held_back_then_released():
    seq, released = feed("a Wor b", SamplingParams(stop=["World"], max_tokens=7))
    assert released[:5] == ["a", " ", "", "", ""]           # "W", "Wo", "Wor" might become "World"
    assert released[5] == "Wor "
    assert "".join(released) == "a Wor b" and seq.finish_reason == "length"


def test_include_stop_str_in_output():
    seq, released = feed("x STOP y", SamplingParams(stop=["STOP"], include_stop_str_in_output=True))
    assert "".join(released) == "x STOP" and seq.finish_reason == "stop"


def test_earliest_of_several_stop_strings_wins():
    seq, _ = feed("abcdef", SamplingParams(stop=["def", "cd"], max_tokens=100))
    assert seq.text == "ab" and seq.stop_reason == "cd"


def test_stop_token_and_eos_finish_without_text():
    seq, released = feed(list(b"ok") + [EOS_ID] + list(b"more"), SamplingParams(max_tokens=100))
    assert seq.finish_reason == "stop" and seq.stop_reason is None      # EOS: None, as in vLLM
    assert seq.output_token_ids == list(b"ok") + [EOS_ID] and "".join(released) == "ok"
    seq, _ = feed(list(b"ok!"), SamplingParams(stop_token_ids=[ord("!")], max_tokens=100))
    assert seq.finish_reason == "stop" and seq.text == "ok" and seq.stop_reason == ord("!")


def test_ignore_eos_keeps_going_until_max_tokens():
    seq, _ = feed([EOS_ID, 65, EOS_ID, 66, 67], SamplingParams(ignore_eos=True, max_tokens=4))
    assert seq.finish_reason == "length" and seq.num_output_tokens == 4
    assert seq.text == "AB"                                 # special tokens skipped in text


def test_special_tokens_are_kept_when_asked():
    seq, _ = feed([65, EOS_ID, 66], SamplingParams(ignore_eos=True, skip_special_tokens=False, max_tokens=3))
    assert seq.text == "A<eos>B"


def test_max_model_len_ends_with_length():
    seq, _ = feed("abcdefgh", SamplingParams(max_tokens=100), max_model_len=len(PROMPT) + 5)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 5
