"""build.py's HTTPS options refuse bad input before building anything (one
clear line naming the file, never the key; nothing left behind)."""
from tests.test_build_errors import EXAMPLE, assert_refused, run_build
from tests.tls_support import make_ca, make_cert


def test_mismatched_key(tmp_path):
    a = make_cert(str(tmp_path), "a")
    b = make_cert(str(tmp_path), "b")
    proc, out = run_build(tmp_path, "--site", str(EXAMPLE), "--tls-cert", a[0], "--tls-key", b[1])
    assert_refused(proc, out, f"key file {b[1]}: does not match the certificate in {a[0]}")
    assert "".join(open(b[1]).read().splitlines()[1:-1])[:32] not in proc.stderr


def test_chain_out_of_order(tmp_path):
    ca = make_ca(str(tmp_path))
    leaf = make_cert(str(tmp_path), "leaf", ca=ca)
    rev = tmp_path / "rev.pem"
    rev.write_text(open(ca[0]).read() + open(leaf[0]).read())
    proc, out = run_build(tmp_path, "--site", str(EXAMPLE), "--tls-cert", str(rev), "--tls-key", leaf[1])
    assert_refused(proc, out, "rev.pem", "out of order")


def test_option_combinations(tmp_path):
    a = make_cert(str(tmp_path), "a")
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--tls-cert", a[0]), "both --tls-cert and --tls-key")
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--tls-cert", a[0], "--tls-key", a[1],
                              "--tls-self-signed", "x.test"), "not both")
    assert_refused(*run_build(tmp_path, "--site", str(EXAMPLE), "--hsts", "5"), "need HTTPS")
