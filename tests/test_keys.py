from tasks.keys import canonical_json, diff_identities, key_of, library_version


def test_key_is_full_width_sha256_and_order_free():
    a = key_of({"b": 1, "a": [1, 2]})
    assert len(a) == 64
    assert a == key_of({"a": [1, 2], "b": 1})
    assert a != key_of({"a": [2, 1], "b": 1})


def test_canonical_json_is_compact_and_sorted():
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


def test_diff_names_each_changed_leaf():
    old = {"params": {"bits": 4, "sym": True}, "inputs": {"from": "k1"}}
    new = {"params": {"bits": 8, "sym": True}, "inputs": {"from": "k1", "data.x": "k2"}}
    assert diff_identities(old, new) == [("inputs.data.x", None, "k2"), ("params.bits", 4, 8)]


def test_missing_library_version_is_absent():
    assert library_version("surely-not-installed-package-xyz") == "absent"


def test_library_versions_are_what_importlib_metadata_says():
    """library_version reads only the headers of each METADATA (a no-op keys ~18 libraries):
    the same version as importlib.metadata for every installed distribution."""
    from importlib import metadata

    names = {d.metadata["Name"] for d in metadata.distributions()}
    assert len(names) > 20
    for name in sorted(names):
        library_version.cache_clear()
        assert library_version(name) == metadata.version(name), name


def test_library_version_takes_any_spelling_of_a_name():
    """A recipe's libraries and pip spell names in several ways (PEP 503 normalizes them)."""
    library_version.cache_clear()
    version = library_version("onnxruntime-genai")
    assert version != "absent"
    for spelling in ("onnxruntime_genai", "ONNXRuntime-GenAI", "onnxruntime.genai"):
        library_version.cache_clear()
        assert library_version(spelling) == version


def test_library_version_leaves_a_zip_on_the_path_to_importlib_metadata(tmp_path, monkeypatch):
    """Distributions inside a zip on sys.path are found by importlib.metadata only: the quick
    folder index steps aside rather than miss one."""
    import zipfile

    from tasks import keys

    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped_pkg-1.2.3.dist-info/METADATA", "Name: zipped-pkg\nVersion: 1.2.3\n\n")
    monkeypatch.syspath_prepend(str(archive))
    keys._metadata_folders.cache_clear()
    library_version.cache_clear()
    try:
        assert keys._metadata_folders() is None
        assert library_version("zipped-pkg") == "1.2.3"
    finally:
        keys._metadata_folders.cache_clear()
        library_version.cache_clear()


def test_library_version_of_a_distribution_gone_since_the_listing_is_absent(monkeypatch):
    """A listed metadata folder that has since gone (an uninstall while doit loads) is looked
    up again, not read as an empty version."""
    from tasks import keys

    monkeypatch.setattr(keys, "_metadata_folders", lambda: {"gone-pkg": "/nonexistent/gone"})
    library_version.cache_clear()
    try:
        assert library_version("gone-pkg") == "absent"
    finally:
        library_version.cache_clear()
