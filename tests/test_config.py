"""--config: precedence (command line > file > default), a run's args.json round trip, YAML and JSON, and one-line
errors naming the file and the key."""
import json

import pytest

from lft.common import ArgumentParser, UserError
from lft.config import describe_sources, parse_args_with_config


def make_parser():
    """The kinds of flags train_lora.py has."""
    p = ArgumentParser()
    p.add_argument("--train_data", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--labels", default=None)
    p.add_argument("--num_epochs", type=int, default=3)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--save_steps", type=int, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--class_weights", choices=("none", "balanced"), default="none")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no_group_by_length", dest="group_by_length", action="store_false")
    return p


def parse(argv):
    return parse_args_with_config(make_parser(), argv)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_precedence_command_line_over_file_over_default(tmp_path):
    cfg = write(tmp_path / "run.yaml", "learning_rate: 1e-4\nnum_epochs: 5\ntrain_data: t.xlsx\nbf16: true\n")
    args, sources = parse(["--config", cfg, "--num_epochs", "7", "--output_dir", "out"])
    assert (args.learning_rate, args.num_epochs, args.train_data, args.bf16, args.output_dir, args.device) == \
        (1e-4, 7, "t.xlsx", True, "out", "auto")
    assert sources == {"train_data": "config", "output_dir": "command line", "labels": "default",
                       "num_epochs": "command line", "learning_rate": "config", "save_steps": "default",
                       "device": "default", "class_weights": "default", "bf16": "config",
                       "group_by_length": "default"}
    assert describe_sources(args, sources) == [
        f"values from {cfg}: train_data, learning_rate, bf16; from the command line: output_dir, num_epochs"]


def test_command_line_detection_is_argparses_own(tmp_path):
    """--flag=value, an abbreviation and a value equal to the default all count as given."""
    cfg = write(tmp_path / "c.json", json.dumps({"num_epochs": 9, "device": "cpu", "train_data": "t"}))
    args, sources = parse([f"--config={cfg}", "--num_ep=3", "--dev", "auto", "--output_dir=o"])
    assert (args.num_epochs, args.device) == (3, "auto")
    assert (sources["num_epochs"], sources["device"], sources["train_data"]) == ("command line",) * 2 + ("config",)


def test_without_config_nothing_changes():
    args, sources = parse(["--train_data", "t", "--output_dir", "o"])
    assert vars(args) == vars(make_parser().parse_args(["--train_data", "t", "--output_dir", "o"])) | {"config": None}
    assert describe_sources(args, sources) == ["values from the command line: train_data, output_dir"]
    assert describe_sources(args, {k: "default" for k in sources}) == []


def test_args_json_round_trip(tmp_path):
    """A run's args.json (vars(args), None for unset) re-parsed with --config gives the same namespace."""
    argv = ["--train_data", "t.xlsx", "--output_dir", "o", "--learning_rate", "3e-05", "--bf16",
            "--no_group_by_length", "--device", "cpu", "--labels", "a,b"]
    args, _ = parse(argv)
    path = tmp_path / "args.json"
    path.write_text(json.dumps(vars(args)), encoding="utf-8")
    again, sources = parse(["--config", str(path)])
    assert vars(again) == vars(args) | {"config": str(path)}
    assert again.learning_rate == 3e-05 and again.group_by_length is False and again.save_steps is None
    assert set(sources.values()) == {"config"}
    # a run re-made from its own args.json writes an args.json whose "config" is ignored when read back
    path2 = tmp_path / "args2.json"
    path2.write_text(json.dumps(vars(again)), encoding="utf-8")
    assert vars(parse(["--config", str(path2)])[0]) == vars(args) | {"config": str(path2)}


def test_yaml_and_json_give_the_same_values(tmp_path):
    y = write(tmp_path / "c.yml", "train_data: t\noutput_dir: o\nlearning_rate: 5e-5\nnum_epochs: '4'\n"
                                  "bf16: 'false'\nno_such: 1\n".replace("no_such: 1\n", "labels: null\n"))
    j = write(tmp_path / "c.json", '{"train_data": "t", "output_dir": "o", "learning_rate": 5e-05, '
                                   '"num_epochs": 4, "bf16": false, "labels": null}')
    a, b = parse(["--config", y])[0], parse(["--config", j])[0]
    assert vars(a) | {"config": None} == vars(b) | {"config": None}
    assert (a.learning_rate, a.num_epochs, a.bf16, a.labels) == (5e-05, 4, False, None)


@pytest.mark.parametrize("text, message", [
    ("learning_rat: 1e-4\n", "--config {p}: unknown key 'learning_rat' (did you mean --learning_rate?)"),
    ("zzz: 1\n", "--config {p}: unknown key 'zzz' (see --help for the flags)"),
    ("num_epochs: three\n", "--config {p}: num_epochs 'three' is not a valid int"),
    ("num_epochs: 2.5\n", "--config {p}: num_epochs 2.5 is not a valid int"),
    ("num_epochs: true\n", "--config {p}: num_epochs True is not a valid int"),
    ("learning_rate: [1, 2]\n", "--config {p}: learning_rate [1, 2] is not a single value"),
    ("device: gpu\n", "--config {p}: device 'gpu' is not one of auto, cpu, cuda"),
    ("bf16: maybe\n", "--config {p}: bf16 'maybe' is not true or false"),
    ("- a\n- b\n", "--config {p}: expected a mapping of flag names to values, got a list"),
    ("a: [\n", "--config {p}: not valid YAML"),
])
def test_bad_file_is_one_line_naming_file_and_key(tmp_path, text, message):
    p = write(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as e:
        parse(["--config", p, "--train_data", "t", "--output_dir", "o"])
    assert str(e.value).startswith(message.format(p=p)) and "\n" not in str(e.value)


def test_bad_json_and_missing_file(tmp_path):
    p = write(tmp_path / "bad.json", "{'a': 1}")
    with pytest.raises(UserError, match=r"^--config .*bad\.json: not valid JSON"):
        parse(["--config", p])
    with pytest.raises(UserError, match=r"^--config .*nope\.yaml: cannot read it"):
        parse(["--config", str(tmp_path / "nope.yaml")])


def test_required_still_required_when_the_file_lacks_it(tmp_path, capsys):
    p = write(tmp_path / "c.yaml", "train_data: t\noutput_dir: null\n")
    with pytest.raises(SystemExit) as e:
        parse(["--config", p])
    assert e.value.code == 2 and "the following arguments are required: --output_dir" in capsys.readouterr().err


def test_parser_is_left_as_it_was(tmp_path):
    p = make_parser()
    parse_args_with_config(p, ["--config", write(tmp_path / "c.yaml", "train_data: t\nnum_epochs: 8\n"),
                               "--output_dir", "o"])
    with pytest.raises(SystemExit):
        p.parse_args(["--output_dir", "o"])  # train_data is still required for the parser itself
    assert p.parse_args(["--train_data", "t", "--output_dir", "o"]).num_epochs == 3
