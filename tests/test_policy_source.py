"""criproxy.policies.source.load: values with their lines, and every SourceError it raises (exact text),
including the bounds against hostile input (size, depth, alias bombs)."""

from __future__ import annotations

import pytest

from criproxy.policies.source import MAX_BYTES, MAX_DEPTH, MAX_VALUES, Document, SourceError, format_path, load

FILE = "p.yaml"

NESTED = """\
apiVersion: v1
rules:
  - name: first
    namespaces: [a, "b-*"]
    settings: {memory-limit: {max: 1Gi}, seccomp-profile: {values: [runtime/default]}}
  - name: second
    namespaces:
      - c
      - d
    mode: audit
"""


def error_of(text: str | bytes) -> SourceError:
    with pytest.raises(SourceError) as info:
        load(text, FILE)
    return info.value


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """Each anchor refers to the previous one `width` times: width**levels values from a few hundred bytes."""
    lines = ['lol0: &lol0 ["lol"' + ', "lol"' * (width - 1) + "]"]
    for i in range(1, levels):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ values and lines


def test_plain_values_are_built_as_yaml_1_1_says() -> None:
    doc = load("s: text\ni: 3\nf: 0.5\nb: true\nn: null\nq: '1'\nl: [1, two]\nm: {k: v}\n", FILE)
    assert doc.data == {"s": "text", "i": 3, "f": 0.5, "b": True, "n": None, "q": "1", "l": [1, "two"],
                        "m": {"k": "v"}}
    assert doc.file == FILE


def test_bytes_and_text_give_the_same_document() -> None:
    assert load(NESTED.encode(), FILE).data == load(NESTED, FILE).data


def test_every_key_path_has_the_line_its_value_starts_on() -> None:
    doc = load(NESTED, FILE)
    assert doc.line(()) == 1
    assert doc.line(("apiVersion",)) == 1
    assert doc.line(("rules", 0)) == 3
    assert doc.line(("rules", 0, "name")) == 3
    assert doc.line(("rules", 0, "namespaces")) == 4
    assert doc.line(("rules", 0, "namespaces", 1)) == 4
    assert doc.line(("rules", 0, "settings", "memory-limit", "max")) == 5
    assert doc.line(("rules", 0, "settings", "seccomp-profile", "values", 0)) == 5
    assert doc.line(("rules", 1)) == 6
    assert doc.line(("rules", 1, "namespaces", 0)) == 8
    assert doc.line(("rules", 1, "namespaces", 1)) == 9
    assert doc.line(("rules", 1, "mode")) == 10


def test_a_path_not_in_the_document_has_the_line_of_its_nearest_ancestor() -> None:
    doc = load(NESTED, FILE)
    assert doc.line(("rules", 1, "settings")) == 6  # the rule has no settings: the rule's line
    assert doc.line(("rules", 0, "namespaces", 7, "x")) == 4
    assert doc.line(("rules", 0, "settings", "cpu-quota", "min")) == 5
    assert doc.line(("nowhere", "at", "all")) == 1


def test_a_document_that_starts_below_comments_has_the_line_of_its_first_key() -> None:
    doc = load("# comment\n\n# another\nkind: AnnotationPolicy\nmode: audit\n", FILE)
    assert doc.line(()) == 4
    assert doc.line(("mode",)) == 5


def test_doc_error_names_file_line_and_key_path() -> None:
    doc = load(NESTED, FILE)
    err = doc.error(("rules", 1, "namespaces", 1), "is wrong")
    assert str(err) == "p.yaml:9: rules[1].namespaces[1]: is wrong"
    assert (err.file, err.line, err.path, err.why) == (FILE, 9, ("rules", 1, "namespaces", 1), "is wrong")
    assert str(doc.error((), "whole file")) == "p.yaml:1: whole file"


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ((), ""),
        (("rules",), "rules"),
        (("rules", 0, "name"), "rules[0].name"),
        ((0, 1, "a"), "[0][1].a"),
        (("a", "b.c", "d"), "a.b.c.d"),
    ],
)
def test_format_path(path: tuple[str | int, ...], text: str) -> None:
    assert format_path(path) == text


def test_source_error_without_a_line_or_a_path() -> None:
    assert str(SourceError("f.yaml", None, (), "broken")) == "f.yaml: broken"
    assert str(SourceError("f.yaml", 3, (), "broken")) == "f.yaml:3: broken"
    assert str(SourceError("f.yaml", None, ("a", 0), "broken")) == "f.yaml: a[0]: broken"
    assert isinstance(SourceError("f", None, (), "x"), ValueError)


def test_keys_are_their_text_even_when_yaml_would_read_them_as_numbers() -> None:
    assert load("1: a\ntrue: b\n0x10: c\n", FILE).data == {"1": "a", "true": "b", "0x10": "c"}


def test_an_alias_gives_a_copy_of_the_anchored_value_without_merge() -> None:
    doc = load("base: &b {x: 1}\nother: *b\n", FILE)
    assert doc.data == {"base": {"x": 1}, "other": {"x": 1}}
    assert doc.line(("other", "x")) == 1  # the anchored node's line


# ------------------------------------------------------------------------------------------ errors, exact texts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2\nb: 3\n", "p.yaml:2: not valid YAML: expected ',' or ']', but got ':'"),
        ("a: 1\n b: 2\n", "p.yaml:2: not valid YAML: mapping values are not allowed here"),
        ("a: b: c\n", "p.yaml:1: not valid YAML: mapping values are not allowed here"),
        ("a:\n\t- b\n", "p.yaml:2: not valid YAML: found character '\\t' that cannot start any token"),
        ('a: "abc\n', "p.yaml:2: not valid YAML: found unexpected end of stream"),
    ],
    ids=["unclosed-flow", "bad-indent", "two-colons", "tab", "unclosed-quote"],
)
def test_invalid_yaml_names_the_line(text: str, message: str) -> None:
    err = error_of(text)
    assert str(err) == message
    assert err.path == ()


def test_bytes_that_are_not_utf8_are_invalid_yaml_without_a_line() -> None:
    err = error_of(b"a: \x80\n")
    assert str(err) == ('p.yaml: not valid YAML: unacceptable character #x0080: invalid start byte\n'
                        '  in "<byte string>", position 3')
    assert err.line is None


def test_control_characters_are_invalid_yaml() -> None:
    assert str(error_of("a: \x07\n")) == ('p.yaml: not valid YAML: unacceptable character #x0007: special characters '
                                          'are not allowed\n  in "<unicode string>", position 3')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: 2\na: 3\n", "p.yaml:3: a: appears twice"),
        ("x:\n  a: 1\n  a: 2\n", "p.yaml:3: x.a: appears twice"),
        ("rules:\n  - {name: a, name: b}\n", "p.yaml:2: rules[0].name: appears twice"),
        ("1: a\n'1': b\n", "p.yaml:2: 1: appears twice"),
    ],
    ids=["top", "nested", "in-a-list", "number-and-string"],
)
def test_duplicate_keys(text: str, message: str) -> None:
    assert str(error_of(text)) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n", "p.yaml:3: other: merge keys (<<) are not supported"),
        ("<<: {x: 1}\n", "p.yaml:1: merge keys (<<) are not supported"),
    ],
    ids=["nested", "top"],
)
def test_merge_keys_are_refused(text: str, message: str) -> None:
    assert str(error_of(text)) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[a]: 1\n", "p.yaml:1: keys must be plain strings"),
        ("x:\n  ? {a: 1}\n  : 2\n", "p.yaml:2: x: keys must be plain strings"),
    ],
    ids=["list-key", "mapping-key"],
)
def test_keys_must_be_scalars(text: str, message: str) -> None:
    assert str(error_of(text)) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !!python/name:os.system ''\n",
         "p.yaml:1: a: unsupported tag 'tag:yaml.org,2002:python/name:os.system'; use plain values"),
        ("a: !!python/object/apply:os.system x\n",
         "p.yaml:1: a: unsupported tag 'tag:yaml.org,2002:python/object/apply:os.system'; use plain values"),
        ("a:\n  b: !ref x\n", "p.yaml:2: a.b: unsupported tag '!ref'; use plain values"),
        ("l: [1, !custom 2]\n", "p.yaml:1: l[1]: unsupported tag '!custom'; use plain values"),
    ],
    ids=["python-name", "python-apply", "local-tag", "in-a-list"],
)
def test_unsupported_tags(text: str, message: str) -> None:
    assert str(error_of(text)) == message


@pytest.mark.parametrize(
    ("text", "found"),
    [("a: 1\n---\nb: 2\n", 2), ("---\na\n---\nb\n---\nc\n", 3), ("", 0), ("# only a comment\n", 0)],
    ids=["two", "three", "empty", "comment-only"],
)
def test_exactly_one_document(text: str, found: int) -> None:
    err = error_of(text)
    assert str(err) == f"p.yaml: expected one YAML document, found {found}"
    assert err.line is None


@pytest.mark.timeout(10)
def test_a_file_over_one_mib_is_refused_before_parsing() -> None:
    text = b"a: " + b"x" * MAX_BYTES  # 1 MiB + 3 bytes, and would be valid YAML
    assert str(error_of(text)) == f"p.yaml: is {MAX_BYTES + 3} bytes; a policy file may be at most 1048576"
    assert MAX_BYTES == 1 << 20


@pytest.mark.timeout(10)
def test_a_file_of_exactly_one_mib_is_parsed() -> None:
    text = b"a: 1\n" + b"#" * (MAX_BYTES - 5)
    assert len(text) == MAX_BYTES
    assert load(text, FILE).data == {"a": 1}


@pytest.mark.timeout(10)
def test_the_size_bound_counts_bytes_of_text_too() -> None:
    text = "a: " + "é" * 600_000  # 600003 characters, 1200003 bytes
    assert str(error_of(text)) == "p.yaml: is 1200003 bytes; a policy file may be at most 1048576"


def nested_lists(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.timeout(10)
def test_nesting_up_to_the_limit_is_fine() -> None:
    assert MAX_DEPTH == 32
    doc = load(nested_lists(MAX_DEPTH + 1), FILE)  # depths 0..32
    value = doc.data
    for _ in range(MAX_DEPTH):
        value = value[0]
    assert value == []


@pytest.mark.timeout(10)
def test_nested_deeper_than_32_levels() -> None:
    err = error_of(nested_lists(MAX_DEPTH + 2))
    assert str(err) == f"p.yaml:1: {'[0]' * 33}: nested deeper than 32 levels"
    assert err.path == (0,) * 33


@pytest.mark.timeout(10)
def test_block_mappings_nested_deeper_than_32_levels_name_the_key_path() -> None:
    text = "k0:\n" + "".join(f"{'  ' * i}k{i}:\n" for i in range(1, 40))
    err = error_of(text)
    assert str(err) == f"p.yaml:34: {'.'.join(f'k{i}' for i in range(33))}: nested deeper than 32 levels"


@pytest.mark.timeout(10)
def test_very_deep_nesting_is_a_source_error_not_a_crash() -> None:
    try:
        err = error_of(nested_lists(1000))  # 2 kB, far below the size bound
    except RecursionError as crash:
        raise RecursionError(str(crash)) from None  # a short traceback: pytest takes seconds to render the deep one
    assert err.why == "nested deeper than 32 levels"


@pytest.mark.timeout(10)
def test_a_billion_laughs_stops_at_the_value_bound() -> None:
    text = billion_laughs()  # 10**9 values from ~500 bytes
    assert len(text) < 1000
    err = error_of(text)
    assert MAX_VALUES == 100_000
    assert str(err) == "p.yaml:1: lol4[7][8][8][8][9]: more than 100000 values (aliases expanding without end?)"


@pytest.mark.timeout(10)
def test_an_alias_bomb_of_mappings_stops_at_the_value_bound() -> None:
    lines = ["m0: &m0 {a: 1, b: 2, c: 3, d: 4}"]
    lines += [f"m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}}}" for i in range(1, 30)]
    err = error_of("\n".join(lines) + "\n")
    assert err.why == "more than 100000 values (aliases expanding without end?)"


def test_just_under_the_value_bound_is_fine() -> None:
    doc = load(billion_laughs(levels=4, width=10), FILE)  # 11 + 111 + 1111 + 11111 values, with the keys' maps
    assert isinstance(doc, Document)
    assert len(doc.data["lol3"]) == 10


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "1" * 5000 + "\n",  # int() refuses more than 4300 digits (ValueError)
        "a: 2001-13-45\n",  # a plain scalar YAML 1.1 reads as a date, month 13 (ValueError)
        "a: !!int abc\n",  # ValueError
        "a: !!float abc\n",  # ValueError
        "a: !!bool abc\n",  # KeyError
        "a: !!timestamp abc\n",  # AttributeError
    ],
    ids=["int-5000-digits", "impossible-date", "int-tag", "float-tag", "bool-tag", "timestamp-tag"],
)
def test_scalars_yaml_cannot_build_are_source_errors(text: str) -> None:
    err = error_of(text)
    assert err.line == 1
    assert err.path == ("a",)


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("a: !!python/object/apply:os.system [echo]\n", "tag:yaml.org,2002:python/object/apply:os.system"),
        ("a: !custom {b: 1}\n", "!custom"),
        ("a: !!set {b: null}\n", "tag:yaml.org,2002:set"),
    ],
    ids=["python-apply-list", "local-tag-mapping", "set"],
)
def test_tags_on_collections_are_unsupported_too(text: str, tag: str) -> None:
    assert str(error_of(text)) == f"p.yaml:1: a: unsupported tag {tag!r}; use plain values"


def test_a_key_with_a_block_value_has_the_line_of_the_key() -> None:
    doc = load("a: 1\nb:\n  c: 2\nd:\n  - x\n", FILE)
    assert (doc.line(("b",)), doc.line(("d",))) == (2, 4)
