"""The run form a Prefect UI user fills in: the schema a served deployment publishes (Prefect builds it from the flow's
signature with the same function used here) and the server's own validator, without starting a server."""
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate

from pipelines.flow import PipelineParams, aligntok_pipeline, run_form_defaults


def _schema() -> dict:
    return parameter_schema(aligntok_pipeline).model_dump_for_openapi()


def _form() -> dict:
    return _schema()["definitions"]["PipelineParams"]["properties"]


def test_optional_fields_show_their_own_type_not_a_union_with_none():
    form = _form()
    for name in ("task", "semantic_weight", "encoder_arch", "tokenizer_kind", "dit_model", "dit_steps", "cfg_scale",
                 "stage_timeout_s"):
        field = form[name]
        assert "anyOf" not in field and field["type"] in ("number", "integer", "string"), (name, field)
        assert "default" not in field, (name, field)  # an empty box, not a pre-filled null
    assert form["tokenizer_kind"]["enum"] == ["aligntok", "vae", "external"]
    assert form["task"]["enum"] == ["class", "text"] and "t2i-smoke: text" in form["task"]["description"]
    assert form["dit_steps"]["exclusiveMinimum"] == 0 and form["cfg_scale"]["minimum"] == 1


def test_each_field_says_its_rule_and_every_profile_value():
    form = _form()
    assert "profiles/ci.yaml" in form["profile"]["description"]
    assert "> 0" in form["dit_steps"]["description"] and ">= 1" in form["cfg_scale"]["description"]
    # the ci profile's values, read from profiles/ci.yaml through the description: CFG 4.0 and 20 DiT steps
    assert "ci: 4.0" in form["cfg_scale"]["description"] and "ci: 20" in form["dit_steps"]["description"]
    assert all(f.get("title") and f.get("description") for f in form.values())


def test_server_side_validation_accepts_the_defaults_and_empty_fields_and_refuses_bad_values():
    schema = _schema()
    defaults = run_form_defaults("ci")
    assert validate(defaults, schema) == []
    assert PipelineParams.model_validate(defaults["params"]).dit_steps is None  # empty: the profile's value
    assert validate({"params": {"profile": "ci", "cfg_scale": 2.0}}, schema) == []
    errors = validate({"params": {"profile": "ci", "dit_steps": -1}}, schema)
    assert errors and "dit_steps" in str(errors[0].path) + str(errors[0].relative_path)
    assert validate({"params": {"profile": "ci", "tokenizer_kind": "other"}}, schema)
