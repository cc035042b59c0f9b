"""base_eval's measurement matches the reference's: bits per byte over 40 x 2^19 tokens per split by default."""

from scripts.base_eval import parse_args


def test_bpb_evaluates_the_references_token_count_unless_told_otherwise():
    assert parse_args([]).bpb_tokens == 40 * 2 ** 19  # 21M tokens per split
    assert parse_args(["--bpb-tokens=131072"]).bpb_tokens == 131072  # runs/cpu.sh's explicit flag
