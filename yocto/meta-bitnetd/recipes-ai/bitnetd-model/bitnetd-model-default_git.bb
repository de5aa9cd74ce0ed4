SUMMARY = "bitnetd's small default model (a BitNet b1.58 decoder trained on WordNet definitions)"
DESCRIPTION = "The model directory bitnetd uses when none is configured: model.onnx, model.onnx.data, \
tokenizer.json, bitnetd.json. For a real model (e.g. microsoft/bitnet-b1.58-2B-4T), export it on a \
workstation with `bitnetd export` and install the directory the same way in your own recipe."
HOMEPAGE = "https://github.com/bitnetd/bitnetd"
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE-MIT;md5=ce721fee261073b0b2c10c061f3e5907 \
                    file://LICENSE-APACHE;md5=22a53954e4e0ec258dfce4391e905dac"

SRC_URI = "git://github.com/bitnetd/bitnetd.git;protocol=https;branch=main"
SRCREV = "${AUTOREV}"
PV = "1.0+git"

inherit allarch

MODEL_FILES = "bitnetd.json model.onnx model.onnx.data tokenizer.json README.md"

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -d ${D}${datadir}/bitnetd/models/default
    for f in ${MODEL_FILES}; do
        install -m 0644 ${S}/models/default/$f ${D}${datadir}/bitnetd/models/default/$f
    done
}

FILES:${PN} = "${datadir}/bitnetd/models/default"
