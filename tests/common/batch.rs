//! Batch test helpers: a manifest of tiny-model items, reference images from
//! `diffusionctl generate --local`, the parity tests' pixel bar, and folder checks.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{ctl_command, root};

/// One manifest item as the tests write it, and the flags that make its images alone.
#[derive(Debug, Clone)]
pub struct TestItem {
    /// Its output name.
    pub name: String,
    /// Its JSON line.
    pub line: String,
    /// `generate --local` flags for the same images (prompt, seed, sizes, steps...).
    pub flags: Vec<String>,
    /// Its files.
    pub files: Vec<String>,
}

/// The tiny model folder.
pub fn tiny() -> PathBuf {
    root().join("onnx/tiny-sd15")
}

/// `n` items at 64×64 with `steps` steps: repeated prompts, a named item, one with two
/// images, one with its own guidance; every seed explicit (1000 + index).
pub fn items(n: usize, steps: u32) -> Vec<TestItem> {
    let prompts = ["a red fox", "the sea at dawn", "a red fox", "a lighthouse"];
    (0..n)
        .map(|i| {
            let prompt = prompts[i % prompts.len()];
            let seed = 1000 + i as u64;
            let name = if i == 1 {
                "named".to_string()
            } else {
                format!("{i:05}")
            };
            let images = if i == 2 { 2 } else { 1 };
            let guidance = if i == 3 { 3.0 } else { 7.5 };
            let mut line = format!(
                r#"{{"prompt":"{prompt}","seed":{seed},"steps":{steps},"width":64,"height":64,"guidance_scale":{guidance}"#
            );
            if i == 1 {
                line.push_str(r#","name":"named""#);
            }
            if images > 1 {
                line.push_str(&format!(r#","num_images":{images}"#));
            }
            line.push('}');
            let flags = [
                "--prompt",
                prompt,
                "--seed",
                &seed.to_string(),
                "--steps",
                &steps.to_string(),
                "--width",
                "64",
                "--height",
                "64",
                "--guidance",
                &guidance.to_string(),
                "--num-images",
                &images.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let files = if images == 1 {
                vec![format!("{name}.png")]
            } else {
                (0..images).map(|k| format!("{name}-{k}.png")).collect()
            };
            TestItem {
                name,
                line,
                flags,
                files,
            }
        })
        .collect()
}

/// Writes the items as a `.jsonl` manifest.
pub fn write_manifest(dir: &Path, items: &[TestItem]) -> PathBuf {
    let path = dir.join("manifest.jsonl");
    let text: String = items.iter().map(|i| format!("{}\n", i.line)).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Every item's images made alone by `diffusionctl generate --local`, in `dir`.
pub fn references(dir: &Path, items: &[TestItem]) -> BTreeMap<String, PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut out = BTreeMap::new();
    for item in items {
        let target = dir.join(format!("{}.png", item.name));
        let mut args: Vec<String> = vec![
            "generate".into(),
            "--local".into(),
            "--model-dir".into(),
            tiny().display().to_string(),
            "--output".into(),
            target.display().to_string(),
        ];
        args.extend(item.flags.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ctl_command(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if item.files.len() == 1 {
            out.insert(item.files[0].clone(), target);
        } else {
            for (k, file) in item.files.iter().enumerate() {
                out.insert(file.clone(), dir.join(format!("{}-{k}.png", item.name)));
            }
        }
    }
    out
}

/// The RGB pixels of a PNG file (it must decode).
pub fn rgb(path: &Path) -> Vec<u8> {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: not a valid PNG: {e}", path.display()))
        .to_rgb8()
        .into_raw()
}

/// The parity tests' bar: no channel off by more than 2, at most 0.1 % off by more than 1.
pub fn assert_close(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let over1 = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.abs_diff(**b) > 1)
        .count();
    let max = got
        .iter()
        .zip(want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(
        max <= 2 && over1 * 1000 <= got.len(),
        "{what}: max {max}, >1: {over1}"
    );
}

/// Every image in `dir` equals its reference.
pub fn assert_matches_references(dir: &Path, refs: &BTreeMap<String, PathBuf>) {
    for (file, reference) in refs {
        assert_close(&rgb(&dir.join(file)), &rgb(reference), file);
    }
}

/// The PNG files directly in `dir`, sorted.
pub fn pngs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".png"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Files anywhere under `dir` that are temporary (`*.partial`), or folders of them.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial")
                || name.ends_with(".tmp")
                || name.starts_with("tmp-")
                || name.starts_with("fetch-")
            {
                found.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    found
}

/// (inode, mtime in ns) of each file: a file written again gets a new inode.
pub fn identities(dir: &Path, files: &[String]) -> BTreeMap<String, (u64, i64)> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).unwrap();
            (
                f.clone(),
                (m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000),
            )
        })
        .collect()
}

/// Waits until `dir` holds at least `n` PNGs; panics after `timeout`, or if `child`
/// exits first.
pub fn wait_for_pngs(dir: &Path, n: usize, child: Option<&mut Child>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut child = child;
    while pngs(dir).len() < n {
        if let Some(c) = child.as_deref_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("the process exited ({status}) before {n} images were written");
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} images after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs a child and reaps it.
pub fn kill9(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Every file the items make, sorted.
pub fn all_files(items: &[TestItem]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().flat_map(|i| i.files.clone()).collect();
    v.sort();
    v
}
