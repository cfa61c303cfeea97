"""NIC driver selection (haboob_build.drivers) against Debian's real kernel."""
from __future__ import annotations

import pytest

from haboob_build import drivers
from haboob_build.errors import BuildError

from . import deploy_support as ds

REQUIRED = ["e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "mlx5", "bnxt", "virtio_net", "vmxnet3", "ena"]


@pytest.fixture(scope="module")
def modules_dir():
    return ds.debian_kernel()[1]


def test_parse_names_and_aliases():
    assert drivers.parse_nic_drivers(None) == drivers.DEFAULT
    assert drivers.parse_nic_drivers("all") == drivers.DEFAULT
    assert set(REQUIRED) <= set(drivers.DEFAULT)
    assert drivers.parse_nic_drivers("Virtio-Net, mlx5_core,bnxt_en,e1000,e1000") == \
        ["virtio_net", "mlx5", "bnxt", "e1000"]
    with pytest.raises(BuildError, match=r"unknown NIC driver 'rtl8139'; known: virtio_net, e1000, .*ena"):
        drivers.parse_nic_drivers("e1000,rtl8139")
    with pytest.raises(BuildError, match="no driver named"):
        drivers.parse_nic_drivers(" , ")


def test_default_set_resolves_in_load_order(modules_dir):
    sel = drivers.select_nic_modules(modules_dir, drivers.DEFAULT)
    names = [s.name for s in sel]
    assert len(names) == len(set(names))
    for must in ["virtio_pci", "virtio_net", "e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "mlx5_core",
                 "bnxt_en", "vmxnet3", "ena"]:
        assert must in names, must
    # dependencies come before their users (modules.dep / modinfo depends=)
    for user, dep in [("virtio_net", "net_failover"), ("net_failover", "failover"), ("virtio_net", "virtio"),
                      ("virtio_pci", "virtio_ring"), ("mlx5_core", "mlxfw"), ("igb", "dca"), ("ixgbe", "mdio")]:
        assert names.index(dep) < names.index(user), (dep, user)
    for s in sel:
        assert s.path.is_file() and s.path.name.split(".ko")[0].replace("-", "_") == s.name


def test_subset_is_only_what_is_asked(modules_dir):
    sel = drivers.select_nic_modules(modules_dir, ["e1000"])
    assert [s.name for s in sel] == ["e1000"]
    sel = drivers.select_nic_modules(modules_dir, ["virtio"])
    assert [s.name for s in sel][-1] == "virtio_net" and "virtio_pci" in [s.name for s in sel]
    assert "e1000" not in [s.name for s in sel]


def test_firmware_needs(modules_dir, tmp_path):
    sel = drivers.select_nic_modules(modules_dir, ["ice", "ixgbe"])
    by = {s.name: s for s in sel}
    assert "intel/ice/ddp/ice.pkg" in by["ice"].firmware
    found, missing = drivers.firmware_files(sel, tmp_path)
    assert found == {} and "intel/ice/ddp/ice.pkg" in missing
    (tmp_path / "intel/ice/ddp").mkdir(parents=True)
    (tmp_path / "intel/ice/ddp/ice.pkg").write_bytes(b"ddp")
    found, missing = drivers.firmware_files(sel, tmp_path)
    assert found == {"intel/ice/ddp/ice.pkg": tmp_path / "intel/ice/ddp/ice.pkg"} and missing == []


def test_not_a_modules_dir(tmp_path):
    with pytest.raises(BuildError, match="not a kernel modules directory"):
        drivers.select_nic_modules(tmp_path, ["e1000"])
