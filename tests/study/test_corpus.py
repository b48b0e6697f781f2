import json

import pytest

from pyro_lmscm.study import CorpusItem, StudyError, read_corpus


def test_txt_groups_comments_and_continuations(corpus_file):
    items = read_corpus(corpus_file)
    assert [item.index for item in items] == list(range(9))
    assert items[0] == CorpusItem(0, "the man said he", None, None, "men")
    assert items[3].group == "women" and items[6].group == "neither"
    assert items[7].prompt == "the story" and items[7].continuation == "day night was"


def test_jsonl_and_csv(tmp_path):
    rows = [{"prompt": "a b", "id": "x1", "group": "g"}, {"prompt": "c", "continuation": " d e"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "c.csv").write_text('prompt,continuation,id,group\na b,,x1,g\nc," d e",,\n')
    expected = [CorpusItem(0, "a b", None, "x1", "g"), CorpusItem(1, "c", " d e", None, None)]
    assert read_corpus(tmp_path / "c.jsonl") == expected
    assert read_corpus(tmp_path / "c.csv") == expected


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("c.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2"),
        ("c.jsonl", '{"text": "a"}\n', "prompt"),
        ("c.jsonl", '{"prompt": "a"}\n{"prompt": "b", "prompt": "c"}\n', "line 2.*'prompt' is given twice"),
        ("c.csv", "text\na\n", "prompt"),
        ("c.txt", "# only a comment\n", "no prompts"),
        ("c.md", "a\n", "expected a .txt"),
    ],
)
def test_bad_corpora(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(StudyError, match=match):
        read_corpus(tmp_path / name)
    with pytest.raises(StudyError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
