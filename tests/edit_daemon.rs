//! Image-to-image, inpainting, LCM-distilled models and AUTOMATIC1111 prompts over D-Bus,
//! with the real daemon on a private bus: the init image and mask sent as bytes
//! (`init_image`, `mask_image`) and as file descriptors (`init_image_fd`, `mask_image_fd`),
//! an LCM model, and `prompt_syntax` `a1111` give the image `diffusionctl generate --local`
//! makes; every bad input is a typed InvalidArgument naming its key, and the daemon keeps
//! serving. Images compare with the parity tests' bar (the daemon and `--local` may run
//! ONNX Runtime with different thread counts).

mod common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use common::batch::assert_close;
use common::{
    Daemon, Dict, PrivateBus, config_text, ctl_command, error_name, generate, png_rgb, result_pngs,
    root, tokio_runtime, wait,
};
use zbus::zvariant::{OwnedValue, Value};

const INVALID: &str = "io.github.Diffusiond1.Error.InvalidArgument";

fn inputs() -> PathBuf {
    root().join("tests/golden/edit/inputs")
}

fn request(pairs: Vec<(&str, Value<'_>)>) -> Dict {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
        .collect()
}

/// `diffusionctl generate --local` on tiny-sd15 with these flags: the PNG's pixels.
fn local(dir: &Path, flags: &[&str]) -> Vec<u8> {
    local_with(dir, "onnx/tiny-sd15", flags)
}

/// `diffusionctl generate --local` on the fixture `model` with these flags: the PNG's pixels.
fn local_with(dir: &Path, model: &str, flags: &[&str]) -> Vec<u8> {
    let out = dir.join("local.png");
    let model = root().join(model);
    let mut args = vec![
        "generate",
        "--local",
        "--model-dir",
        model.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let o = ctl_command(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    png_rgb(&std::fs::read(out).unwrap())
}

fn fd(path: &Path) -> OwnedValue {
    let file = std::fs::File::open(path).unwrap();
    Value::from(zbus::zvariant::Fd::from(OwnedFd::from(file)))
        .try_to_owned()
        .unwrap()
}

#[test]
fn images_as_bytes_and_as_fds_give_the_local_image() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let init = inputs().join("init-96x64.png");
    let mask = inputs().join("mask-96x64-soft.png");
    let common = [
        "--prompt",
        "a lighthouse",
        "--seed",
        "77",
        "--steps",
        "4",
        "--scheduler",
        "euler-a",
    ];
    let mut img2img: Vec<&str> = common.to_vec();
    img2img.extend(["--init-image", init.to_str().unwrap(), "--strength", "0.75"]);
    let want_img2img = local(dir.path(), &img2img);
    let mut inpaint = img2img.clone();
    inpaint.extend(["--mask-image", mask.to_str().unwrap()]);
    let want_inpaint = local(dir.path(), &inpaint);
    assert_ne!(want_img2img, want_inpaint, "the mask changes the image");

    // diffusionctl through the daemon sends the images as bytes.
    let out = dir.path().join("daemon.png");
    let mut args = vec!["generate", "--address", bus.address(), "--output"];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(&inpaint);
    let o = ctl_command(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = std::fs::read(&out).unwrap();
    assert_close(&png_rgb(&png), &want_inpaint, "inpaint, bytes");
    let params = String::from_utf8_lossy(&png).to_string();
    assert!(
        params.contains("Mode: inpaint"),
        "PNG parameters record the mode"
    );
    assert!(params.contains("Denoising strength: 0.75"));
    assert!(params.contains("Mask hash: "));

    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let base = |extra: Vec<(&'static str, OwnedValue)>| {
            let mut r = request(vec![
                ("prompt", Value::from("a lighthouse")),
                ("seed", Value::U64(77)),
                ("steps", Value::U32(4)),
                ("scheduler", Value::from("euler-a")),
                ("strength", Value::F64(0.75)),
            ]);
            r.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
            r
        };
        // Bytes, straight over zbus.
        let bytes = std::fs::read(&init).unwrap();
        let job = generate(
            &conn,
            base(vec![(
                "init_image",
                Value::from(bytes).try_to_owned().unwrap(),
            )]),
        )
        .await
        .unwrap();
        let result = wait(&conn, &job).await.unwrap();
        assert_close(
            &png_rgb(&result_pngs(&result)[0]),
            &want_img2img,
            "img2img, bytes",
        );
        // File descriptors.
        let job = generate(&conn, base(vec![("init_image_fd", fd(&init))]))
            .await
            .unwrap();
        let result = wait(&conn, &job).await.unwrap();
        assert_close(
            &png_rgb(&result_pngs(&result)[0]),
            &want_img2img,
            "img2img, fd",
        );
        let job = generate(
            &conn,
            base(vec![
                ("init_image_fd", fd(&init)),
                ("mask_image_fd", fd(&mask)),
            ]),
        )
        .await
        .unwrap();
        let result = wait(&conn, &job).await.unwrap();
        assert_close(
            &png_rgb(&result_pngs(&result)[0]),
            &want_inpaint,
            "inpaint, fds",
        );
    });
}

/// A long prompt with weights, an escape and BREAK, in AUTOMATIC1111's syntax.
const A1111_PROMPT: &str = "a (lighthouse:1.3) at dusk, \\(oil\\) painting, [blurry], \
    waves, rocks, seagulls, clouds, a small boat, fishermen, nets, a harbour, old houses, \
    cobblestones, lanterns, a church tower, hills, pine trees, a winding road, a bridge, \
    BREAK ((dramatic sky)), storm, rain, lightning, golden hour, warm light, long shadows, \
    volumetric fog, highly detailed, masterpiece, best quality, sharp focus, rich colors, \
    a river winding through the valley, birds, distant mountains, snow";

#[test]
fn lcm_models_and_a1111_prompts_over_dbus_give_the_local_image() {
    let bus = PrivateBus::start();
    let lcm = root().join("onnx/tiny-lcm");
    let _d = Daemon::start_with_config(
        &bus,
        &config_text(&format!("[models.lcm]\npath = \"{}\"\n", lcm.display())),
    );
    let dir = tempfile::tempdir().unwrap();
    let init = inputs().join("init-64x64.png");
    let lcm_flags = [
        "--prompt",
        "a lighthouse",
        "--seed",
        "5",
        "--steps",
        "4",
        "--guidance",
        "8",
    ];
    let want_lcm = local_with(dir.path(), "onnx/tiny-lcm", &lcm_flags);
    let mut lcm_edit = lcm_flags.to_vec();
    lcm_edit.extend(["--init-image", init.to_str().unwrap(), "--strength", "0.5"]);
    let want_lcm_edit = local_with(dir.path(), "onnx/tiny-lcm", &lcm_edit);
    let a1111 = [
        "--prompt",
        A1111_PROMPT,
        "--negative-prompt",
        "(ugly:1.2), text",
        "--seed",
        "9",
        "--steps",
        "3",
    ];
    let mut a1111_flags = a1111.to_vec();
    a1111_flags.extend(["--prompt-syntax", "a1111"]);
    let want_a1111 = local(dir.path(), &a1111_flags);
    assert_ne!(
        want_a1111,
        local(dir.path(), &a1111),
        "the syntax changes the image"
    );

    // diffusionctl through the daemon, LCM image-to-image.
    let out = dir.path().join("daemon.png");
    let mut args = vec!["generate", "--address", bus.address(), "--model", "lcm"];
    args.extend(["--output", out.to_str().unwrap()]);
    args.extend_from_slice(&lcm_edit);
    let o = ctl_command(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_close(
        &png_rgb(&std::fs::read(&out).unwrap()),
        &want_lcm_edit,
        "LCM img2img",
    );

    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let job = generate(
            &conn,
            request(vec![
                ("model", Value::from("lcm")),
                ("prompt", Value::from("a lighthouse")),
                ("seed", Value::U64(5)),
                ("steps", Value::U32(4)),
                ("guidance_scale", Value::F64(8.0)),
            ]),
        )
        .await
        .unwrap();
        let result = wait(&conn, &job).await.unwrap();
        assert_close(&png_rgb(&result_pngs(&result)[0]), &want_lcm, "LCM txt2img");

        let job = generate(
            &conn,
            request(vec![
                ("prompt", Value::from(A1111_PROMPT)),
                ("negative_prompt", Value::from("(ugly:1.2), text")),
                ("seed", Value::U64(9)),
                ("steps", Value::U32(3)),
                ("prompt_syntax", Value::from("a1111")),
            ]),
        )
        .await
        .unwrap();
        let result = wait(&conn, &job).await.unwrap();
        let png = &result_pngs(&result)[0];
        assert_close(&png_rgb(png), &want_a1111, "a1111 prompt");
        assert!(
            String::from_utf8_lossy(png).contains("Prompt syntax: a1111"),
            "the PNG parameters record the syntax"
        );

        // Past limits.max_prompt_chunks (8) once tokenized: the job fails as an invalid
        // argument naming the limit, and the daemon goes on.
        let breaks = |n: usize| {
            request(vec![
                ("prompt", Value::from("a lighthouse BREAK ".repeat(n))),
                ("steps", Value::U32(1)),
                ("prompt_syntax", Value::from("a1111")),
            ])
        };
        let job = generate(&conn, breaks(9)).await.unwrap();
        let err = wait(&conn, &job).await.unwrap_err();
        assert_eq!(error_name(&err), INVALID, "{err:?}");
        assert!(format!("{err:?}").contains("max_prompt_chunks"), "{err:?}");
        let job = generate(&conn, breaks(7)).await.unwrap();
        assert_eq!(result_pngs(&wait(&conn, &job).await.unwrap()).len(), 1);
    });
}

/// A PNG whose header says `width` × `height` (the pixel data is a small image's: only
/// the header is read before the request is refused).
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = std::fs::read(inputs().join("init-64x64.png")).unwrap();
    // Signature (8), IHDR length (4), "IHDR" (4), width, height, then 5 bytes, then CRC.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// CRC-32 (ISO-HDLC), as PNG chunks carry it; a test helper, so written out here.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn every_bad_image_input_is_a_typed_error_naming_its_key() {
    let bus = PrivateBus::start();
    let inpaint_model = root().join("onnx/tiny-sd15-inpaint");
    let _d = Daemon::start_with_config(
        &bus,
        &config_text(&format!(
            "[models.inpaint]\npath = \"{}\"\n",
            inpaint_model.display()
        )),
    );
    let init = std::fs::read(inputs().join("init-64x64.png")).unwrap();
    let other_size = std::fs::read(inputs().join("mask-96x64-hard.png")).unwrap();
    let bytes = |b: &[u8]| Value::from(b.to_vec());
    let p = || ("prompt", Value::from("x"));
    let cases: Vec<(Vec<(&str, Value<'_>)>, &str)> = vec![
        (
            vec![p(), ("init_image", bytes(b"not an image at all"))],
            "'init_image'",
        ),
        (
            vec![
                p(),
                ("init_image", bytes(&init)),
                ("mask_image", bytes(&other_size)),
            ],
            "must be the same size",
        ),
        (
            vec![p(), ("init_image", bytes(&png_claiming(100_000, 100_000)))],
            "'init_image'",
        ),
        (
            vec![
                p(),
                ("init_image", bytes(&init)),
                ("strength", Value::F64(1.5)),
            ],
            "'strength'",
        ),
        (
            vec![
                p(),
                ("init_image", bytes(&init)),
                ("strength", Value::F64(0.0)),
            ],
            "'strength'",
        ),
        (vec![p(), ("mask_image", bytes(&init))], "needs init_image"),
        (vec![p(), ("strength", Value::F64(0.5))], "'strength'"),
        (
            vec![p(), ("model", Value::from("inpaint"))],
            "inpainting model",
        ),
        (
            vec![p(), ("init_image", bytes(&init)), ("width", Value::U32(64))],
            "'width'",
        ),
        (
            vec![
                p(),
                ("init_image", bytes(&init)),
                ("steps", Value::U32(4)),
                ("strength", Value::F64(0.2)),
            ],
            "'strength'",
        ),
        (
            vec![p(), ("init_image", Value::from("a path"))],
            "'init_image'",
        ),
        (
            vec![p(), ("prompt_syntax", Value::from("webui"))],
            "'prompt_syntax'",
        ),
    ];
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        for (pairs, needle) in cases {
            let shown: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
            let err = generate(&conn, request(pairs)).await.unwrap_err();
            assert_eq!(error_name(&err), INVALID, "{shown:?}: {err:?}");
            assert!(format!("{err:?}").contains(needle), "{shown:?}: {err:?}");
        }
        // A pipe is not a regular file: refused, not read (it could block for ever).
        let (_reader, writer) = std::io::pipe().unwrap();
        let pipe = Value::from(zbus::zvariant::Fd::from(OwnedFd::from(writer)))
            .try_to_owned()
            .unwrap();
        let mut req = request(vec![p()]);
        req.insert("init_image_fd".into(), pipe);
        let err = generate(&conn, req).await.unwrap_err();
        assert!(format!("{err:?}").contains("regular file"), "{err:?}");
        // A sound header over data cut short: accepted, then the job fails as an invalid
        // argument when it decodes the image.
        let job = generate(
            &conn,
            request(vec![p(), ("init_image", bytes(&init[..60]))]),
        )
        .await
        .unwrap();
        let err = wait(&conn, &job).await.unwrap_err();
        assert_eq!(error_name(&err), INVALID, "{err:?}");
        assert!(format!("{err:?}").contains("init_image"), "{err:?}");
        // The daemon still serves.
        let job = generate(&conn, request(vec![p(), ("steps", Value::U32(1))]))
            .await
            .unwrap();
        assert_eq!(result_pngs(&wait(&conn, &job).await.unwrap()).len(), 1);
    });
}
