SUMMARY = "Edge AI daemon: BitNet b1.58 on tract, with MQTT, a Unix socket and cloud forwarding"
DESCRIPTION = "bitnetd runs BitNet b1.58 (ternary) language models on the board through tract, with NEON \
kernels, serves a Unix socket and MQTT, keeps to a memory, latency and temperature budget, and forwards \
complex tasks to Kimi when the board is online."
HOMEPAGE = "https://github.com/bitnetd/bitnetd"
SECTION = "net"
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE-MIT;md5=ce721fee261073b0b2c10c061f3e5907 \
                    file://LICENSE-APACHE;md5=22a53954e4e0ec258dfce4391e905dac"

SRC_URI = "git://github.com/bitnetd/bitnetd.git;protocol=https;branch=main"
# Pin a release commit for reproducible images (SRCREV:pn-bitnetd in local.conf or a bbappend).
SRCREV = "${AUTOREV}"
PV = "0.1.0+git"

# Every crate of Cargo.lock, with its checksum: regenerate with `bitbake -c update_crates bitnetd` or
# scripts/update-crates-inc.py (tests/yocto.rs keeps it in sync).
require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# Needs Rust >= 1.89 (see the layer README).
CARGO_BUILD_FLAGS += "--bin bitnetd"

# The group whose members may use the API socket (SocketGroup= in bitnetd.socket).
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system bitnetd"

# The socket is enabled and activates the service on the first connection; nothing else starts at boot.
SYSTEMD_SERVICE:${PN} = "bitnetd.socket"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/bitnetd.service ${D}${systemd_system_unitdir}/bitnetd.service
    install -m 0644 ${S}/systemd/bitnetd.socket ${D}${systemd_system_unitdir}/bitnetd.socket
    install -m 0644 ${S}/systemd/bitnetd-http.socket ${D}${systemd_system_unitdir}/bitnetd-http.socket
    install -d ${D}${sysconfdir}/bitnetd
    install -m 0644 ${S}/packaging/bitnetd.toml ${D}${sysconfdir}/bitnetd/bitnetd.toml
}

FILES:${PN} += "${systemd_system_unitdir}/bitnetd.service ${systemd_system_unitdir}/bitnetd.socket ${systemd_system_unitdir}/bitnetd-http.socket"
CONFFILES:${PN} = "${sysconfdir}/bitnetd/bitnetd.toml"

# The shipped default model; replace it with your own model recipe, or point [model] path elsewhere.
RRECOMMENDS:${PN} = "bitnetd-model-default"
