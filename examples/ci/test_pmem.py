"""A test suite run in the guest of examples/ci/guest.yaml through nvmprov's pytest plugin:

    .venv/bin/python -m pytest examples/ci --nvmprov-spec examples/ci/guest.yaml --junitxml artifacts/pytest.xml

`nvmprov_spec_guest` is the guest of --nvmprov-spec: created by this run, or (as in the CI examples,
where `nvmprov create` made it first) re-verified without a boot and left for the job's last step.
Replace these tests with your own: `run`/`sudo` quote each argument, testinfra-style.
"""


def test_the_region_is_dax(nvmprov_spec_guest):
    data = nvmprov_spec_guest.regions["data"]
    assert data.dax is True and data.data_ok is True
    options = nvmprov_spec_guest.check_output("findmnt -no OPTIONS %s", data.mountpoint)
    assert {"dax", "dax=always"} & set(options.split(",")), options  # ext4 says dax=always, xfs dax


def test_an_application_writes_to_persistent_memory(nvmprov_spec_guest):
    g = nvmprov_spec_guest
    path = g.regions["data"].mountpoint + "/ci app.dat"
    r = g.sudo("dd if=/dev/urandom of=%s bs=1M count=4 status=none && sync && sha256sum %s", path, path)
    assert r.rc == 0, r.stderr
    assert g.sudo("sha256sum %s", path).stdout == r.stdout
    assert g.sudo("rm %s", path).rc == 0
