//! `diffusionctl batch --local` end to end, with the real ONNX Runtime and the tiny model:
//! a SIGKILL mid-batch and a rerun finish the batch with every image written once and
//! equal to `generate --local`'s; a third run does nothing; shards share one folder; bad
//! manifests give line-numbered errors; an unwritable file pauses the batch, a rerun
//! resumes it.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::batch::{
    all_files, assert_close, assert_matches_references, identities, items, kill9, leftovers, pngs,
    references, rgb, tiny, wait_for_pngs, write_manifest,
};
use common::ctl_command;

fn batch_args(manifest: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "batch".into(),
        manifest.display().to_string(),
        "--output-dir".into(),
        out.display().to_string(),
        "--local".into(),
        "--model-dir".into(),
        tiny().display().to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl_command(&args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_killed_batch_resumes_writes_each_image_once_and_matches_generate_local() {
    let dir = tempfile::tempdir().unwrap();
    let items = items(10, 12);
    let manifest = write_manifest(dir.path(), &items);
    let out = dir.path().join("out");
    let args = batch_args(&manifest, &out, &[]);

    // Run 1: SIGKILL once a few images are in place.
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = ctl_command(&argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_pngs(&out, 2, Some(&mut child), Duration::from_secs(120));
    kill9(&mut child);
    let before = pngs(&out);
    assert!(
        before.len() < all_files(&items).len(),
        "the batch finished before it was killed; make it longer"
    );
    let kept = identities(&out, &before);

    // Run 2: the same command finishes the rest.
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), all_files(&items));
    assert_eq!(
        identities(&out, &before),
        kept,
        "images written before the kill were not made again"
    );
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));

    // Every image equals the one `generate --local` makes alone.
    let refs = references(&dir.path().join("refs"), &items);
    assert_matches_references(&out, &refs);

    // Run 3: nothing to do.
    let all = identities(&out, &all_files(&items));
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already complete"), "{}", text(&o));
    assert_eq!(identities(&out, &all_files(&items)), all);

    // A default the lines take (they give no negative prompt) changes the batch: refused
    // for this folder, until --restart. (One the lines all override, like --steps, does
    // not change any image, so it is the same batch.)
    let o = run(&batch_args(&manifest, &out, &["--steps", "3"]));
    assert!(text(&o).contains("already complete"), "{}", text(&o));
    let o = run(&batch_args(
        &manifest,
        &out,
        &["--negative-prompt", "blurry"],
    ));
    assert!(!o.status.success());
    assert!(text(&o).contains("--restart"), "{}", text(&o));
}

/// The crash window between the renames of a two-image item's files and the store's
/// "done": the state file is put back into it (item pending, first file in place, second
/// missing), as a SIGKILL there leaves it. The rerun writes only the missing file.
#[test]
fn a_crash_between_an_items_files_keeps_the_file_already_written() {
    let dir = tempfile::tempdir().unwrap();
    let items = items(3, 2);
    let manifest = write_manifest(dir.path(), &items);
    let out = dir.path().join("out");
    let args = batch_args(&manifest, &out, &[]);
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    let two = &items[2];
    assert_eq!(two.files, ["00002-0.png", "00002-1.png"]);

    let state = out.join(".diffusiond/batch-0-of-1.sqlite");
    let db = rusqlite::Connection::open(&state).unwrap();
    let changed = db
        .execute(
            "UPDATE items SET state = 'pending', bytes = 0 WHERE name = ?1",
            [&two.name],
        )
        .unwrap();
    assert_eq!(changed, 1, "the item is in {}", state.display());
    drop(db);
    let second = out.join(&two.files[1]);
    let want = rgb(&second);
    std::fs::remove_file(&second).unwrap();
    let kept = identities(&out, &two.files[..1]);
    let others = identities(
        &out,
        &[items[0].files[0].clone(), items[1].files[0].clone()],
    );

    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), all_files(&items));
    assert_eq!(
        identities(&out, &two.files[..1]),
        kept,
        "first file rewritten"
    );
    assert_eq!(
        identities(
            &out,
            &[items[0].files[0].clone(), items[1].files[0].clone()]
        ),
        others,
        "finished items run again"
    );
    // The same image (it may have shared a UNet batch with other items the first time).
    assert_close(&rgb(&second), &want, &two.files[1]);
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

#[test]
fn two_shards_fill_one_folder_with_every_item_once() {
    let dir = tempfile::tempdir().unwrap();
    let items = items(7, 3);
    let manifest = write_manifest(dir.path(), &items);
    let out = dir.path().join("out");
    let shard = |s: &str| {
        let args = batch_args(&manifest, &out, &["--shard", s]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl_command(&argv).output_async()
    };
    // Both shards at once, into one folder.
    let (a, b) = (shard("0/2"), shard("1/2"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    assert_eq!(pngs(&out), all_files(&items));
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    let states: Vec<String> = std::fs::read_dir(out.join(".diffusiond"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sqlite"))
        .collect();
    assert_eq!(states.len(), 2, "one state file per shard: {states:?}");
    let refs = references(&dir.path().join("refs"), &items);
    assert_matches_references(&out, &refs);
}

/// `Command::output`, started now and collected later.
trait Spawned {
    fn output_async(&mut self) -> std::process::Child;
}

impl Spawned for std::process::Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

#[test]
fn a_random_base_seed_is_printed_recorded_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("prompts.txt");
    std::fs::write(&manifest, "a red fox\nthe sea at dawn\n").unwrap();
    let out = dir.path().join("out");
    let args = batch_args(
        &manifest,
        &out,
        &["--steps", "3", "--width", "64", "--height", "64"],
    );
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let base: u64 = t
        .split("base seed ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no base seed in: {t}"));
    assert!(t.contains("random; recorded"), "{t}");
    assert_eq!(pngs(&out), ["00000.png", "00001.png"]);
    // Line 1 used base + 1, as `generate --local --seed` would.
    let reference = dir.path().join("ref.png");
    let seed = (base + 1).to_string();
    let o = ctl_command(&[
        "generate",
        "--local",
        "--model-dir",
        tiny().to_str().unwrap(),
        "--prompt",
        "the sea at dawn",
        "--seed",
        &seed,
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        reference.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    common::batch::assert_close(
        &common::batch::rgb(&out.join("00001.png")),
        &common::batch::rgb(&reference),
        "line 1",
    );
    // The rerun reuses the recorded seed: it is the same batch, and complete.
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already complete"), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("base seed {base}")),
        "{}",
        text(&o)
    );
}

#[test]
fn bad_manifests_give_one_error_per_line_and_run_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bad.jsonl");
    std::fs::write(
        &manifest,
        [
            r#"{"prompt":"fine","width":64,"height":64,"steps":2}"#,
            r#"{"prompt":"x","steps":"many"}"#,
            r#"{"prompt":"y","width":65}"#,
            r#"not json"#,
            r#"{"prompt":"z","colour":"red"}"#,
            r#"{"prompt":"a","name":"dup"}"#,
            r#"{"prompt":"b","name":"dup"}"#,
            r#"{"prompt":"c","guidance_scale":1e9}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = run(&batch_args(&manifest, &out, &[]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    for needle in [
        "the manifest has 6 error(s); nothing was run",
        "line 2: 'steps': expected an integer",
        "line 3: 'width': 65 is not a multiple of",
        "line 4: not valid JSON",
        "line 5: 'colour': unknown key",
        "line 7: 'name': 'dup' makes dup.png, as line 6 does",
        "line 8: 'guidance_scale':",
    ] {
        assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
    }
    assert!(!out.exists(), "nothing is created for a bad manifest");
}

#[test]
fn an_unwritable_file_pauses_the_batch_and_a_rerun_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let items = items(5, 2);
    let manifest = write_manifest(dir.path(), &items);
    let out = dir.path().join("out");
    // A folder where item 3's image goes: renaming the image onto it fails.
    std::fs::create_dir_all(out.join("00003.png/blocker")).unwrap();
    let args = batch_args(&manifest, &out, &[]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("batch paused: cannot write"), "{t}");
    assert!(t.contains("00003.png"), "{t}");
    assert!(t.contains("rerun the same command to resume"), "{t}");
    std::fs::remove_dir_all(out.join("00003.png")).unwrap();
    let o = run(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), all_files(&items));
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

/// Image-to-image and inpainting lines name their images relative to the manifest; each
/// image equals `generate --local`'s with the same files; a line naming a missing file is
/// refused before anything runs; a changed image makes it another batch.
#[test]
fn edit_lines_read_images_relative_to_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = common::root().join("tests/golden/edit/inputs");
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["init-96x64.png", "mask-96x64-hard.png"] {
        std::fs::copy(inputs.join(f), images.join(f)).unwrap();
    }
    let manifest = dir.path().join("edits.jsonl");
    std::fs::write(
        &manifest,
        concat!(
            r#"{"prompt":"a lighthouse","seed":5,"steps":4,"init_image":"images/init-96x64.png","strength":0.75,"name":"img2img"}"#,
            "\n",
            r#"{"prompt":"a lighthouse","seed":6,"steps":4,"init_image":"images/init-96x64.png","mask_image":"images/mask-96x64-hard.png","name":"inpaint"}"#,
            "\n",
            r#"{"prompt":"plain","seed":7,"steps":4,"width":64,"height":64,"name":"plain"}"#,
            "\n",
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = run(&batch_args(&manifest, &out, &[]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), ["img2img.png", "inpaint.png", "plain.png"]);
    let init = images.join("init-96x64.png");
    let mask = images.join("mask-96x64-hard.png");
    let refs = dir.path().join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let model = tiny();
    for (name, extra) in [
        (
            "img2img",
            vec![
                "--seed",
                "5",
                "--init-image",
                init.to_str().unwrap(),
                "--strength",
                "0.75",
            ],
        ),
        (
            "inpaint",
            vec![
                "--seed",
                "6",
                "--init-image",
                init.to_str().unwrap(),
                "--mask-image",
                mask.to_str().unwrap(),
            ],
        ),
    ] {
        let target = refs.join(format!("{name}.png"));
        let mut args = vec![
            "generate",
            "--local",
            "--model-dir",
            model.to_str().unwrap(),
            "--prompt",
            "a lighthouse",
            "--steps",
            "4",
            "--output",
            target.to_str().unwrap(),
        ];
        args.extend(extra);
        let g = ctl_command(&args).output().unwrap();
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
        assert_close(&rgb(&out.join(format!("{name}.png"))), &rgb(&target), name);
    }
    // Another image under the same name: another batch (refused for this folder).
    std::fs::copy(
        inputs.join("init-96x64.png"),
        images.join("mask-96x64-hard.png"),
    )
    .unwrap();
    let o = run(&batch_args(&manifest, &out, &[]));
    assert!(!o.status.success());
    assert!(text(&o).contains("--restart"), "{}", text(&o));
    // A missing file: one error naming the line and key, nothing run.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        r#"{"prompt":"x","init_image":"images/nope.png"}"#.to_string() + "\n",
    )
    .unwrap();
    let o = run(&batch_args(&bad, &dir.path().join("out2"), &[]));
    assert!(!o.status.success());
    assert!(text(&o).contains("init_image"), "{}", text(&o));
    assert!(!dir.path().join("out2").join("00000.png").exists());
}

/// A shard that selects no item (shard 3/4 of a two-line manifest) is refused with an
/// error that says so; it does not succeed with nothing made.
#[test]
fn a_shard_that_selects_no_item_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &items(2, 1));
    let out = dir.path().join("out");
    let o = run(&batch_args(&manifest, &out, &["--shard", "3/4"]));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("shard 3/4 selects none of the manifest's 2 item(s)"),
        "{}",
        text(&o)
    );
    assert!(pngs(&out).is_empty());
}
