"""Stage 02 helpers: the text a step is embedded from."""

from __future__ import annotations

from tasks.templates import step_line_text

SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"


def test_step_text_is_its_line_without_calculator_annotations():
    assert step_line_text(SOLUTION, 0) == "Natalia sold 48/2 = 24 clips in May."
    assert step_line_text(SOLUTION, 1) == "Natalia sold 48+24 = 72 clips altogether."


def test_out_of_range_line_falls_back_to_the_whole_solution():
    assert step_line_text("a = <<1+1=2>>2", 5) == "a = 2"
