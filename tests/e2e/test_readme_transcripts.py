"""The README's transcripts are what the demos print: each is run here
(readme_transcripts.py: `make demo`'s walkthrough, `make demo-fleet`'s,
`make demo-client`) and compared with its README block, times and free
ports aside. On a difference, the fresh transcript is in the failure; run
`.venv/bin/python tests/e2e/readme_transcripts.py --update` to take it."""

import pytest

import readme_transcripts as rt


@pytest.mark.parametrize("name", list(rt.RUNS))
def test_the_readme_transcript_is_what_the_demo_prints(name):
    blocks = rt.readme_blocks()
    assert name in blocks, f"README.md has no <!-- transcript: {name} --> block"
    fresh = rt.RUNS[name]()
    assert rt.normalise(blocks[name]) == rt.normalise(fresh), f"fresh transcript:\n{fresh}"


def test_every_transcript_block_has_a_run():
    assert set(rt.readme_blocks()) == set(rt.RUNS)


def test_normalise_keeps_what_matters():
    """Times and demo-client's ports may differ; a status, a header or a
    count may not."""
    a = '[2026-11-23T22:35:28.316Z] "POST /payments" 201 key="k"\nelapsed:             1.4 s\nproxy :42249'
    b = '[2026-12-02T01:21:31.776Z] "POST /payments" 201 key="k"\nelapsed:             2.2 s\nproxy :40927'
    assert rt.normalise(a) == rt.normalise(b)
    assert rt.normalise(a) != rt.normalise(a.replace(" 201 ", " 409 "))
    assert rt.trim("HTTP/1.1 201 Created\r\nserver: envoy\r\ndate: x\r\nx-envoy-upstream-service-time: 1\r\n"
                   "retry-after: 1\r\n\r\n") == "HTTP/1.1 201 Created\nretry-after: 1\n\n"
