//! What can be checked of the Yocto layer without bitbake: `bitnetd-crates.inc` covers `Cargo.lock` (every
//! crates.io package with its checksum, nothing stale), the files the recipes install exist, the license
//! checksums are right, and the layer names the Yocto series whose Rust meets `rust-version`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn layer() -> PathBuf {
    root().join("yocto/meta-bitnetd")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_crates_include_matches_cargo_lock() {
    let lock: toml::Table = toml::from_str(&read(&root().join("Cargo.lock"))).unwrap();
    let inc = read(&layer().join("recipes-ai/bitnetd/bitnetd-crates.inc"));
    let mut wanted = BTreeSet::new();
    for p in lock["package"].as_array().unwrap() {
        if p.get("source").and_then(|s| s.as_str())
            != Some("registry+https://github.com/rust-lang/crates.io-index")
        {
            continue;
        }
        let (name, version) = (p["name"].as_str().unwrap(), p["version"].as_str().unwrap());
        let checksum = p["checksum"].as_str().unwrap();
        assert!(
            inc.contains(&format!("    crate://crates.io/{name}/{version} \\\n")),
            "{name} {version} is missing from bitnetd-crates.inc: run \
             python3 yocto/meta-bitnetd/scripts/update-crates-inc.py"
        );
        assert!(
            inc.contains(&format!(
                "SRC_URI[{name}-{version}.sha256sum] = \"{checksum}\""
            )),
            "{name} {version}: checksum missing or wrong in bitnetd-crates.inc"
        );
        wanted.insert(format!("{name}/{version}"));
    }
    let listed: BTreeSet<String> = inc
        .lines()
        .filter_map(|l| l.trim().strip_prefix("crate://crates.io/"))
        .map(|l| l.trim_end_matches(" \\").to_string())
        .collect();
    let stale: Vec<_> = listed.difference(&wanted).collect();
    assert!(
        stale.is_empty(),
        "crates no longer in Cargo.lock: {stale:?}"
    );
    assert!(wanted.len() > 100, "Cargo.lock was read");
}

#[test]
fn the_files_the_recipes_install_exist() {
    let recipes = [
        "recipes-ai/bitnetd/bitnetd_git.bb",
        "recipes-ai/bitnetd-model/bitnetd-model-default_git.bb",
    ];
    let mut checked = 0;
    for r in recipes {
        let text = read(&layer().join(r));
        // `${S}/path` is a path in the repository.
        for part in text.split("${S}/").skip(1) {
            let path: String = part
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '$')
                .collect();
            let path = path.trim_end_matches('/');
            if text.contains("for f in ${MODEL_FILES}") && path == "models/default" {
                let files = text
                    .lines()
                    .find_map(|l| l.strip_prefix("MODEL_FILES = "))
                    .unwrap()
                    .trim_matches('"');
                for f in files.split_whitespace() {
                    assert!(root().join(path).join(f).is_file(), "{r}: {path}/{f}");
                    checked += 1;
                }
                continue;
            }
            assert!(
                root().join(path).exists(),
                "{r} installs {path}, which is not in the repository"
            );
            checked += 1;
        }
        // LIC_FILES_CHKSUM entries: the file exists and its md5 is the one stated.
        for part in text.split("file://").skip(1) {
            let entry: String = part
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            let Some((file, md5)) = entry.split_once(";md5=") else {
                continue;
            };
            let out = std::process::Command::new("md5sum")
                .arg(root().join(file))
                .output()
                .unwrap();
            let sum = String::from_utf8_lossy(&out.stdout);
            assert!(
                sum.starts_with(md5),
                "{r}: {file} md5 is {sum}, the recipe says {md5}"
            );
            checked += 1;
        }
        assert!(
            text.contains("inherit cargo cargo-update-recipe-crates systemd")
                || !r.contains("bitnetd_git")
        );
    }
    assert!(checked >= 12, "only {checked} paths checked");
}

#[test]
fn the_layer_names_series_whose_rust_is_new_enough() {
    let conf = read(&layer().join("conf/layer.conf"));
    let compat = conf
        .lines()
        .find_map(|l| l.strip_prefix("LAYERSERIES_COMPAT_bitnetd = "))
        .expect("LAYERSERIES_COMPAT_bitnetd");
    // Rust shipped by openembedded-core per series; rust-version in Cargo.toml must not exceed it.
    let rust_of = |series: &str| match series {
        "scarthgap" => (1, 75),
        "styhead" => (1, 79),
        "walnascar" => (1, 84),
        "whinlatter" => (1, 90),
        "wrynose" => (1, 94),
        other => panic!("unknown series {other}"),
    };
    let manifest: toml::Table = toml::from_str(&read(&root().join("Cargo.toml"))).unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    let (major, minor) = msrv.split_once('.').unwrap();
    let msrv = (major.parse::<u32>().unwrap(), minor.parse::<u32>().unwrap());
    for series in compat.trim_matches('"').split_whitespace() {
        assert!(
            rust_of(series) >= msrv,
            "{series} ships Rust {:?}, below {msrv:?}",
            rust_of(series)
        );
    }
    let readme = read(&layer().join("README.md"));
    assert!(
        readme.contains(&format!("Rust {}.{}", msrv.0, msrv.1)),
        "the README names the MSRV"
    );
}
