"""Name → URL translation: virtlet's config shape, our precedence and our stricter checks."""

import textwrap

import pytest

from image_service import translation
from image_service.names import parse
from image_service.translation import ConfigError, Translator, load, parse_documents

CONFIG = {
    "translations": [
        {"name": "cirros", "url": "https://download.cirros-cloud.net/0.5.2/cirros-0.5.2-x86_64-disk.img"},
        {"name": "ubuntu:22.04", "url": "https://cloud-images.ubuntu.com/jammy/current/jammy.img"},
        {"name": "ubuntu", "url": "https://cloud-images.ubuntu.com/noble/current/noble.img"},
        {"regexp": r"cirros/(\d\.\d\.\d)", "url": "https://download.cirros-cloud.net/$1/cirros-$1-x86_64-disk.img"},
        {"regexp": r"centos/(?P<major>\d+)-(\d+)", "url": "http://mirror.local/${major}/c-$2.qcow2",
         "transport": "lan"},
        {"regexp": r"cirros/.*", "url": "https://fallback.example/cirros.img"},
    ],
    "transports": {"lan": {"allowHTTP": True, "timeout": 60000, "maxRedirects": 1}},
}


def translate(image, *docs):
    return Translator(parse_documents(list(docs) or [CONFIG], "test.yaml")).translate(parse(image))


def test_default_without_rules_is_https_of_the_name_without_tag():
    ep = Translator().translate(parse("virtlet.cloud/download.cirros-cloud.net/0.3.5/cirros.img:latest"))
    assert ep.url == "https://download.cirros-cloud.net/0.3.5/cirros.img"
    assert ep.transport.allowHTTP is False and ep.transport.redirects == 9
    digest = "0" * 64
    assert Translator().translate(parse(f"virtlet.cloud/h/p@sha256:{digest}")).url == "https://h/p"


def test_exact_names_with_and_without_tag():
    assert translate("virtlet.cloud/cirros").url.endswith("0.5.2/cirros-0.5.2-x86_64-disk.img")
    assert translate("virtlet.cloud/cirros:anything").url.endswith("0.5.2/cirros-0.5.2-x86_64-disk.img")
    assert translate("virtlet.cloud/ubuntu:22.04").url.endswith("jammy.img")  # name:tag beats name
    assert translate("virtlet.cloud/ubuntu:24.04").url.endswith("noble.img")


def test_regexp_groups_numbered_and_named_and_transport():
    assert translate("virtlet.cloud/cirros/0.3.5").url == \
        "https://download.cirros-cloud.net/0.3.5/cirros-0.3.5-x86_64-disk.img"
    ep = translate("virtlet.cloud/centos/7-01:latest")
    assert ep.url == "http://mirror.local/7/c-01.qcow2"
    assert ep.transport.allowHTTP and ep.transport.timeout == 60000 and ep.transport.redirects == 1
    assert "regexp" in ep.rule and "test.yaml" in ep.rule


def test_regexps_match_the_whole_name_in_order():
    # virtlet searched anywhere in the name; a partial match must not translate.
    assert translate("virtlet.cloud/evil/cirros/0.3.5").url == "https://evil/cirros/0.3.5"
    assert translate("virtlet.cloud/cirros/0.3.5x").url == "https://fallback.example/cirros.img"


def test_exact_names_beat_regexps_across_configs():
    first = {"translations": [{"regexp": "cirros", "url": "https://regexp.example/x"}]}
    second = {"translations": [{"name": "cirros", "url": "https://exact.example/x"}]}
    assert translate("virtlet.cloud/cirros", first, second).url == "https://exact.example/x"


def test_prefix():
    doc = {"prefix": "my-prefix", "translations": [{"name": "cirros", "url": "https://p.example/c.img"}]}
    assert translate("virtlet.cloud/my-prefix/cirros", doc).url == "https://p.example/c.img"
    assert translate("virtlet.cloud/cirros", doc).url == "https://cirros"  # prefix-less: the default
    assert translate("virtlet.cloud/my-prefix/other", doc).url == "https://my-prefix/other"


def test_empty_named_transport_applies_to_rules_without_one():
    doc = {"translations": [{"name": "a", "url": "http://lan/a"}], "transports": {"": {"allowHTTP": True}}}
    assert translate("virtlet.cloud/a", doc).transport.allowHTTP


def test_load_file_with_several_documents_and_a_virtlet_image_mapping(tmp_path):
    f = tmp_path / "images.yaml"
    f.write_text(textwrap.dedent("""\
        translations:
        - name: one
          url: https://one.example/1.img
        ---
        apiVersion: virtlet.k8s/v1
        kind: VirtletImageMapping
        metadata: {name: primary, namespace: kube-system}
        spec:
          prefix: p
          translations:
          - name: two
            url: https://two.example/2.img
        """))
    t = load(f)
    assert t.translate(parse("virtlet.cloud/one")).url == "https://one.example/1.img"
    assert t.translate(parse("virtlet.cloud/p/two")).url == "https://two.example/2.img"
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.yaml").write_text("translations: [{name: a, url: 'https://a.example/a'}]\n")
    (d / "b.yml").write_text("translations: [{name: b, url: 'https://b.example/b'}]\n")
    (d / "ignored.txt").write_text("not: [yaml")
    assert load(d).translate(parse("virtlet.cloud/b")).url == "https://b.example/b"
    assert load(None).translate(parse("virtlet.cloud/b")).url == "https://b"


@pytest.mark.parametrize("rule, message", [
    ({"regexp": "cirros/(", "url": "https://x/$1"}, "does not compile"),
    ({"regexp": "a(b)", "url": "https://x/$2"}, "refers to $2"),
    ({"regexp": "a(b)", "url": "https://x/${nope}"}, "refers to $nope"),
    ({"name": "a", "regexp": "b", "url": "https://x"}, "exactly one of"),
    ({"url": "https://x"}, "exactly one of"),
    ({"name": "a"}, "url"),
    ({"name": "a", "url": "file:///etc/passwd"}, "scheme 'file'"),
    ({"regexp": "(.*)", "url": "file:///$1"}, "scheme 'file'"),
    ({"name": "a", "url": "https://user:pw@host/x"}, "credentials"),
    ({"name": "a", "url": "http://host/x"}, "plain http"),
    ({"name": "a", "url": "https://host/x", "transport": "missing"}, "transport 'missing' is not defined"),
    ({"name": "a", "url": "https://host/x", "bogus": 1}, "bogus"),
])
def test_bad_rules_are_load_errors_naming_the_rule(rule, message):
    with pytest.raises(ConfigError) as e:
        parse_documents([{"translations": [rule]}], "bad.yaml")
    text = str(e.value)
    assert "bad.yaml" in text and message in text
    label = rule.get("name") or rule.get("regexp")
    if label:
        assert repr(label) in text


@pytest.mark.parametrize("transport, message", [
    ({"proxy": "http://proxy:3128"}, "proxy is not supported"),
    ({"maxRedirects": -1}, "maxRedirects"),
    ({"timeout": "soon"}, "timeout"),
    ({"tls": {"insecure": "maybe"}}, "insecure"),
])
def test_bad_transports_are_load_errors(transport, message):
    with pytest.raises(ConfigError, match=message):
        parse_documents([{"translations": [], "transports": {"t": transport}}], "bad.yaml")


def test_bad_yaml_and_duplicates(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("translations: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot read"):
        load(f)
    dup = [{"translations": [{"name": "a", "url": "https://x/1"}]}, {"translations": [{"name": "a", "url": "https://x/2"}]}]
    with pytest.raises(ConfigError, match="'a'.*already translated"):
        Translator(parse_documents(dup, "dup.yaml"))
    with pytest.raises(ConfigError, match="prefix"):
        parse_documents([{"prefix": "../etc"}], "p.yaml")
    with pytest.raises(ConfigError, match="dictionary"):
        parse_documents([["not", "a", "mapping"]], "l.yaml")


def test_default_transport_is_https_only():
    assert translation.DEFAULT_TRANSPORT.allowHTTP is False
    assert translation.DEFAULT_TRANSPORT.readTimeout == 30000
