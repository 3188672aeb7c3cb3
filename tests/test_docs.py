from pathlib import Path

from tasks.docgen import tables

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_matches_the_code():
    """docs/recipes.md carries the generated key tables; regenerate with python -m tasks.docgen."""
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert tables() in doc, "docs/recipes.md is stale: rerun `python -m tasks.docgen`"


def test_every_recipe_in_the_repo_loads(tmp_path):
    from tasks.graph import load_graph

    for recipe in sorted((ROOT / "recipes").glob("*.toml")):
        graph = load_graph(recipe, tmp_path)
        assert graph.keys["report"]
