"""Live-session logic without models: turn-taking, clause cutting, what was heard, tool calls."""

from __future__ import annotations

import asyncio
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.errors import InferenceError, ServiceUnavailable
from handler.sessions.clauses import (
    MAX_CLAUSE_CHARS,
    MAX_FIRST_CLAUSE_CHARS,
    ReplyText,
    next_clause_chars,
)
from handler.sessions.playback import PlaybackClock, VoicedClause, heard_text
from handler.sessions.tools import ToolCallError, checked_arguments
from handler.sessions.turn_taking import (
    EARLY_END_SILENCE_MS,
    END_SILENCE_MS,
    MAX_SPEECH_MS,
    SPEECH_PAD_MS,
    VAD_WINDOW,
    RecentAudio,
    SpeechPaused,
    SpeechResumed,
    SpeechSegmenter,
    SpeechStarted,
    SpeechStopped,
)
from handler.transcription import TimedWord

WINDOW_MS = VAD_WINDOW / 16


def decisions(probabilities: list[float], threshold: float = 0.5) -> list[object]:
    segmenter = SpeechSegmenter(threshold)
    return [d for p in probabilities if (d := segmenter.push(p)) is not None]


def test_speech_starts_at_first_window_over_threshold_with_padding() -> None:
    found = decisions([0.1] * 10 + [0.9] * 20 + [0.05] * 40)
    pad = int(SPEECH_PAD_MS * 16)
    assert found[0] == SpeechStarted(10 * VAD_WINDOW - pad)
    stopped = found[-1]
    assert isinstance(stopped, SpeechStopped)
    assert stopped.end == 30 * VAD_WINDOW + pad and stopped.is_turn


def test_speech_stops_only_after_the_end_silence() -> None:
    silence_windows = int(np.ceil(END_SILENCE_MS / WINDOW_MS))
    short_pause = [0.9] * 20 + [0.05] * (silence_windows - 1) + [0.9] * 20
    assert SpeechStopped not in [type(d) for d in decisions(short_pause)]
    ended = decisions(short_pause + [0.05] * silence_windows)
    assert [type(d) for d in ended][-1] is SpeechStopped


def test_a_pause_names_the_end_the_stop_confirms() -> None:
    early_windows = int(np.ceil(EARLY_END_SILENCE_MS / WINDOW_MS))
    silence_windows = int(np.ceil(END_SILENCE_MS / WINDOW_MS))
    found = decisions([0.9] * 20 + [0.05] * (early_windows - 1))
    assert [type(d) for d in found] == [SpeechStarted]
    _, paused, stopped = decisions([0.9] * 20 + [0.05] * silence_windows)
    assert isinstance(paused, SpeechPaused) and isinstance(stopped, SpeechStopped)
    assert (paused.start, paused.end) == (stopped.start, stopped.end)
    assert stopped.is_turn


def test_speech_after_a_pause_voids_it_and_the_next_pause_ends_later() -> None:
    early_windows = int(np.ceil(EARLY_END_SILENCE_MS / WINDOW_MS))
    silence_windows = int(np.ceil(END_SILENCE_MS / WINDOW_MS))
    found = decisions([0.9] * 20 + [0.05] * early_windows + [0.9] * 10 + [0.05] * silence_windows)
    kinds = [type(d) for d in found]
    assert kinds == [SpeechStarted, SpeechPaused, SpeechResumed, SpeechPaused, SpeechStopped]
    first_pause, resumed, second_pause, stopped = found[1:]
    assert isinstance(first_pause, SpeechPaused) and isinstance(second_pause, SpeechPaused)
    assert isinstance(resumed, SpeechResumed) and isinstance(stopped, SpeechStopped)
    assert resumed.sample == (20 + early_windows) * VAD_WINDOW
    assert first_pause.end < second_pause.end == stopped.end


def test_hysteresis_keeps_speech_between_the_two_thresholds() -> None:
    # 0.4 is under the 0.5 start threshold but over 0.5 - 0.15: speech goes on.
    found = decisions([0.9] * 5 + [0.4] * 60)
    assert [type(d) for d in found] == [SpeechStarted]


def test_threshold_decides_whether_quiet_speech_counts() -> None:
    quiet = [0.6] * 30 + [0.0] * 40
    assert decisions(quiet, threshold=0.8) == []
    assert [type(d) for d in decisions(quiet, threshold=0.3)] == [
        SpeechStarted,
        SpeechPaused,
        SpeechStopped,
    ]


def test_a_click_interrupts_but_is_not_a_turn() -> None:
    found = decisions([0.9] * 2 + [0.0] * 40)
    assert [type(d) for d in found] == [SpeechStarted, SpeechStopped]
    assert isinstance(found[1], SpeechStopped) and not found[1].is_turn


@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_speech_that_never_falls_silent_ends_a_turn_every_max_speech(threshold: float) -> None:
    # 70 s of steady speech (or, at threshold 0.0, of anything at all).
    max_windows = int(MAX_SPEECH_MS // WINDOW_MS)
    found = decisions([0.9 if threshold else 0.0] * (70_000 * 16 // VAD_WINDOW), threshold)
    stops = [d for d in found if isinstance(d, SpeechStopped)]
    starts = [d for d in found if isinstance(d, SpeechStarted)]
    assert len(stops) == 2 and len(starts) == 3
    assert all(s.is_turn and s.end - s.start <= MAX_SPEECH_MS * 16 for s in stops)
    assert stops[0].end == max_windows * VAD_WINDOW
    assert starts[1].sample <= stops[0].end + VAD_WINDOW


def take_all(text: ReplyText, limit: int) -> list[str]:
    """Every clause ``text`` can hand out now at ``limit`` (a voice that is always free)."""
    clauses = []
    while (clause := text.cut(limit)) is not None:
        clauses.append(clause)
    return clauses


@given(
    st.lists(
        st.tuples(
            st.text(alphabet=st.sampled_from("abc ,.!?;xyz"), min_size=1, max_size=12),
            st.integers(min_value=1, max_value=MAX_CLAUSE_CHARS),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_clauses_keep_every_character_in_order_and_their_limit(
    writes: list[tuple[str, int, bool]],
) -> None:
    text = ReplyText()
    clauses: list[tuple[str, int]] = []
    for piece, limit, voice_free in writes:
        text.write(piece)
        if voice_free:
            clauses += [(c, limit) for c in take_all(text, limit)]
    text.end()
    last_limit = writes[-1][1]
    clauses += [(c, last_limit) for c in take_all(text, last_limit)]
    written = "".join(piece for piece, _, _ in writes)
    assert "".join(c for c, _ in clauses).replace(" ", "") == written.replace(" ", "")
    assert all(c == c.strip() and c for c, _ in clauses)
    assert all(len(c) <= limit for c, limit in clauses)


def test_clauses_cut_at_sentences_and_long_enough_clauses_only() -> None:
    text = ReplyText()
    words = "Yes. Well, I think that is right, as far as I can tell. Pi is 3.14 or so! And then"
    clauses = []
    for word in words.split(" "):
        text.write(word + " ")
        clauses += take_all(text, MAX_CLAUSE_CHARS)
    text.end()
    assert clauses + take_all(text, MAX_CLAUSE_CHARS) == [
        "Yes.",
        "Well, I think that is right,",
        "as far as I can tell.",
        "Pi is 3.14 or so!",
        "And then",
    ]


def test_text_written_while_the_voice_is_busy_is_cut_at_the_last_mark_within_the_limit() -> None:
    text = ReplyText()
    text.write("Sure! The sky is blue. It scatters light, mostly blue light, all day long")
    assert text.cut(40) == "Sure! The sky is blue."
    assert text.cut(40) == "It scatters light, mostly blue light,"
    assert text.cut(20) is None  # 12 characters and no mark: wait for more
    text.end()
    assert take_all(text, 20) == ["all day long"]


def test_without_marks_a_clause_ends_at_the_last_space_before_its_limit() -> None:
    text = ReplyText()
    text.write(" ".join(["word"] * 30) + " ")
    assert [len(c or "") for c in (text.cut(20), text.cut(42), text.cut(7))] == [19, 39, 4]
    one_word = ReplyText()
    one_word.write("Supercalifragilisticexpialidocious")
    assert one_word.cut(10) == "Supercalif"


def test_a_mark_does_not_cut_before_the_next_character_arrives() -> None:
    text = ReplyText()
    text.write("It costs 3.")
    assert text.cut(MAX_CLAUSE_CHARS) is None
    text.write("5 euros. Next")
    assert text.cut(MAX_CLAUSE_CHARS) == "It costs 3.5 euros."


def test_next_clause_waits_for_a_complete_clause_then_for_the_end() -> None:
    async def scenario() -> list[str | None]:
        text = ReplyText()
        taken: list[str | None] = []

        async def voice() -> None:
            while True:
                taken.append(await text.next_clause(lambda: MAX_FIRST_CLAUSE_CHARS))
                if taken[-1] is None:
                    return

        reader = asyncio.create_task(voice())
        for piece in ["Hello", " there", ". How", " are you"]:
            text.write(piece)
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert taken == ["Hello there."]
        text.end()
        await asyncio.wait_for(reader, 1.0)
        return taken

    assert asyncio.run(scenario()) == ["Hello there.", "How are you", None]


def test_the_clause_limit_follows_the_audio_queued_ahead_of_playback() -> None:
    # 2 s queued, the voice at 25 ms per character: 80 characters fit.
    assert next_clause_chars(2.0, 0.025) == 80
    # Little or nothing queued (a short "Sure!" playing, a stall): the first clause's limit.
    assert next_clause_chars(0.3, 0.08) == MAX_FIRST_CLAUSE_CHARS
    assert next_clause_chars(0.0, 0.025) == MAX_FIRST_CLAUSE_CHARS
    # A fast voice (a GPU) or a long queue: the longest piece.
    assert next_clause_chars(30.0, 0.025) == MAX_CLAUSE_CHARS
    assert next_clause_chars(1.0, 0.0) == MAX_CLAUSE_CHARS


def test_playback_follows_real_time_then_client_reports() -> None:
    now = [100.0]
    clock = PlaybackClock(lambda: now[0])
    assert clock.played_ms() == 0.0
    clock.sent(2000.0)
    now[0] += 0.5
    assert clock.played_ms() == pytest.approx(500.0)
    now[0] += 10
    assert clock.played_ms() == 2000.0  # never more than was sent
    clock.report(700.0)
    assert clock.played_ms() == 700.0
    assert clock.remaining_s() == pytest.approx(1.3)
    now[0] += 0.2  # playback goes on between reports
    assert clock.played_ms() == pytest.approx(900.0)
    clock.report(650.0)  # an older report changes nothing
    assert clock.played_ms() == pytest.approx(900.0)


def clause(text: str, start_s: float, seconds: float) -> VoicedClause:
    return VoicedClause(text, start_s, np.zeros(int(seconds * 1000), np.float32), 1000)


def test_heard_text_keeps_whole_clauses_and_words_whose_end_was_played() -> None:
    clauses = [clause("Hello there.", 0.0, 1.0), clause("I can help, surely.", 1.0, 2.0)]

    words = {
        "Hello there.": [TimedWord("hello", 0.1, 0.6), TimedWord("there", 0.6, 0.9)],
        "I can help, surely.": [
            TimedWord("i", 0.0, 0.3),
            TimedWord("can", 0.3, 0.6),
            TimedWord("help", 0.6, 1.0),
            TimedWord("surely", 1.0, 2.0),
        ],
    }

    async def align(c: VoicedClause) -> list[TimedWord]:
        return words[c.text]

    assert asyncio.run(heard_text(clauses, 1.7, align)) == "Hello there. I can"
    assert asyncio.run(heard_text(clauses, 0.7, align)) == "Hello"
    assert asyncio.run(heard_text(clauses, 3.0, align)) == "Hello there. I can help, surely."


def test_heard_text_keeps_a_written_word_the_aligner_split_once_all_of_it_played() -> None:
    clauses = [clause("The age-old adage holds.", 0.0, 2.0)]
    split = [TimedWord("the", 0.0, 0.2), TimedWord("age", 0.2, 0.5), TimedWord("old", 0.5, 0.8),
             TimedWord("adage", 0.8, 1.4), TimedWord("holds", 1.4, 2.0)]

    async def align(c: VoicedClause) -> list[TimedWord]:
        return split

    assert asyncio.run(heard_text(clauses, 0.6, align)) == "The"
    assert asyncio.run(heard_text(clauses, 0.9, align)) == "The age-old"
    assert asyncio.run(heard_text(clauses, 1.5, align)) == "The age-old adage"


@pytest.mark.parametrize("failure", [InferenceError("no alignment"),
                                     ServiceUnavailable("Triton is unreachable")])
def test_heard_text_falls_back_to_the_played_share_when_alignment_fails(
    failure: Exception,
) -> None:
    async def align(c: VoicedClause) -> list[TimedWord]:
        raise failure

    clauses = [clause("one two three four", 0.0, 2.0)]
    assert asyncio.run(heard_text(clauses, 1.0, align)) == "one two"


def test_heard_text_does_not_wait_long_for_an_aligner_that_lags() -> None:
    cancelled = asyncio.Event()

    async def align(c: VoicedClause) -> list[TimedWord]:
        try:
            await asyncio.Event().wait()  # a busy aligner: no answer in time
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    # Without the wait limit this never returns (wait_for's 5 s raise TimeoutError).
    heard = asyncio.run(asyncio.wait_for(
        heard_text([clause("one two three four", 0.0, 2.0)], 1.5, align), 5.0))
    assert heard == "one two three" and cancelled.is_set()


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {"day": {"type": "string"}, "people": {"type": "integer"}},
                "required": ["day"],
            },
        },
    }
]


def test_tool_arguments_are_checked_against_the_schema() -> None:
    assert checked_arguments("book", '{"day": "monday", "people": 2}', TOOLS) == {
        "day": "monday",
        "people": 2,
    }
    with pytest.raises(ToolCallError, match="people"):
        checked_arguments("book", '{"day": "monday", "people": "two"}', TOOLS)
    with pytest.raises(ToolCallError, match=r"required|day"):
        checked_arguments("book", "{}", TOOLS)
    with pytest.raises(ToolCallError, match="unknown tool"):
        checked_arguments("cancel", "{}", TOOLS)
    with pytest.raises(ToolCallError, match="not JSON"):
        checked_arguments("book", "{day", TOOLS)


def test_arguments_are_checked_with_the_draft_the_schema_names() -> None:
    # Draft 4's boolean exclusiveMaximum (a number there from draft 6 on).
    draft4 = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "object",
        "properties": {"x": {"type": "number", "maximum": 5, "exclusiveMaximum": True}},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": draft4}}]
    assert checked_arguments("f", '{"x": 3}', tools) == {"x": 3}
    with pytest.raises(ToolCallError, match="x"):
        checked_arguments("f", '{"x": 5}', tools)


@given(st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=30),
       st.sampled_from([1, 64, VAD_WINDOW]))
def test_recent_audio_holds_the_last_samples_by_stream_position_and_their_arrival(
    chunk_sizes: list[int], window: int,
) -> None:
    capacity = 1000
    recent = RecentAudio(capacity, window)
    stream = np.arange(sum(chunk_sizes), dtype=np.float32)
    position = 0
    chunk_of_sample = np.zeros(len(stream), dtype=np.int64)
    for index, size in enumerate(chunk_sizes):
        recent.append(stream[position : position + size], arrived_at=float(index))
        chunk_of_sample[position : position + size] = index
        position += size
    first_kept = max(0, position - capacity)
    for end in range(first_kept + 1, position + 1):
        # When the window holding sample end - 1 was complete: exact at window ends.
        window_end = min((end - 1) // window * window + window, position)
        assert recent.arrived_at(end) == chunk_of_sample[window_end - 1]
        if end % window == 0:
            assert recent.arrived_at(end) == chunk_of_sample[end - 1]
    np.testing.assert_array_equal(recent.between(first_kept, position), stream[first_kept:])
    with pytest.raises(ValueError):
        recent.between(first_kept, position + 1)
    # A range reaching back past what is held gives the part still held.
    np.testing.assert_array_equal(recent.between(0, position), stream[first_kept:])
    assert len(recent.between(0, first_kept)) == 0


def test_recent_audio_holds_one_arrival_time_per_window_however_small_the_messages() -> None:
    """A flood of one-sample messages: what is held does not grow with their number."""
    recent = RecentAudio(60 * 16_000)  # the runner's: 60 s at 16 kHz
    one_sample = np.ones(1, np.float32)
    recent.append(one_sample, arrived_at=0.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(1, 20_000):
            recent.append(one_sample, arrived_at=float(index))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 16 * 1024  # one record per message held about 2 MB here
    assert recent.arrived_at(VAD_WINDOW) == VAD_WINDOW - 1  # the window's last sample's time
    assert recent.arrived_at(20_000) == 19_999  # the partial last window: the last message
