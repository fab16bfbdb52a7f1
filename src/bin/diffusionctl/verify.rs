//! `diffusionctl verify IMAGE.png [--model-dir DIR | --model NAME]`: reads the image's
//! `parameters` chunk (`diffusiond::request::infotext`), checks the model hash, generates
//! the image again with the same settings (in-process with `--model-dir`, through the
//! daemon otherwise) and compares the pixels: `identical`, `within N levels` or
//! `different`. Reading the files and generating come first; the comparison and the
//! checks of the chunk against the flags are pure functions, tested below.

use std::path::{Path, PathBuf};

use clap::Args;
use diffusiond::client::{GenerateRequest, OnInterrupt};
use diffusiond::config::{self, Settings};
use diffusiond::local;
use diffusiond::lora::LoraCatalog;
use diffusiond::model::ModelBundle;
use diffusiond::model::hash::HashCache;
use diffusiond::request::infotext::{self, Receipt};
use diffusiond::request::{ImageInput, Mode};

use super::{BusArgs, Failure, progress};

/// Largest per-channel difference still reported as `within N levels` (and exit 0):
/// what another ONNX Runtime build, provider or UNet batch can change. Above it the
/// image is `different`.
pub const WITHIN_LEVELS: u8 = 8;

/// Flags of `verify` (a contract: scripts call them by these names).
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The PNG to check (made by diffusiond: it carries a `parameters` chunk).
    #[arg(value_name = "IMAGE.png")]
    image: PathBuf,
    /// Generate again in this process from this model folder.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// Generate again through the daemon with this configured model (default: the model
    /// the image names).
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// The init image of an image-to-image or inpainting image, given again (checked
    /// against the `Init image hash` it records).
    #[arg(long, value_name = "FILE")]
    init_image: Option<PathBuf>,
    /// The mask of an inpainting image, given again (checked against its `Mask hash`).
    #[arg(long, value_name = "FILE", requires = "init_image")]
    mask_image: Option<PathBuf>,
    /// The control image of each ControlNet the image records (`ControlNet 0`, …), given
    /// again in that order (repeatable; not checked by hash: the record has none).
    #[arg(long, value_name = "FILE")]
    control_image: Vec<PathBuf>,
    /// With --model-dir: a LoRA file the image names (its `Loras` or `<lora:...>` tags),
    /// given again (repeatable; checked against its `Lora hashes`).
    #[arg(long, value_name = "FILE", requires = "model_dir")]
    lora: Vec<PathBuf>,
    #[command(flatten)]
    bus: BusArgs,
}

/// How the regenerated image compares with the one checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every pixel equal.
    Identical,
    /// Pixels differ by at most [`WITHIN_LEVELS`] levels per channel.
    Within {
        /// The largest difference, in levels (1..=255).
        levels: u8,
        /// Pixels with any channel different.
        pixels: usize,
        /// Pixels in the image.
        total: usize,
    },
    /// Pixels differ by more, or the sizes differ.
    Different {
        /// The largest difference (255 when the sizes differ).
        levels: u8,
        /// Pixels with any channel different (all, when the sizes differ).
        pixels: usize,
        /// Pixels in the image.
        total: usize,
    },
}

impl Verdict {
    /// Whether the image counts as reproduced (exit status 0).
    pub fn reproduced(self) -> bool {
        !matches!(self, Verdict::Different { .. })
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Verdict::Identical => f.write_str("identical"),
            Verdict::Within {
                levels,
                pixels,
                total,
            } => write!(
                f,
                "within {levels} level{} ({pixels} of {total} pixels differ)",
                if levels == 1 { "" } else { "s" }
            ),
            Verdict::Different {
                levels,
                pixels,
                total,
            } => write!(
                f,
                "different (max pixel difference {levels}; {pixels} of {total} pixels differ)"
            ),
        }
    }
}

/// Compares two RGB8 images of `size` (`a`, `b`: their sizes and pixels). Pure.
pub fn compare(a: ((u32, u32), &[u8]), b: ((u32, u32), &[u8])) -> Verdict {
    let total = (a.0.0 as usize) * (a.0.1 as usize);
    if a.0 != b.0 || a.1.len() != b.1.len() {
        return Verdict::Different {
            levels: 255,
            pixels: total,
            total,
        };
    }
    let mut levels = 0u8;
    let mut pixels = 0;
    for (p, q) in a.1.chunks_exact(3).zip(b.1.chunks_exact(3)) {
        let d = p
            .iter()
            .zip(q)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        if d > 0 {
            pixels += 1;
            levels = levels.max(d);
        }
    }
    match levels {
        0 => Verdict::Identical,
        l if l <= WITHIN_LEVELS => Verdict::Within {
            levels: l,
            pixels,
            total,
        },
        l => Verdict::Different {
            levels: l,
            pixels,
            total,
        },
    }
}

/// A PNG's `parameters` text (iTXt, tEXt or zTXt), size and RGB8 pixels.
struct Png {
    text: Option<String>,
    size: (u32, u32),
    rgb: Vec<u8>,
}

fn read_png(bytes: &[u8], what: &str) -> Result<Png, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{what}: not a PNG diffusiond can read: {e}");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .map_err(|e| bad(&e))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut buf).map_err(|e| bad(&e))?;
    // Text chunks after the image data count too.
    let _ = reader.finish();
    let info = reader.info();
    let text = info
        .utf8_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .and_then(|c| c.get_text().ok())
        .or_else(|| {
            info.uncompressed_latin1_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .map(|c| c.text.clone())
        })
        .or_else(|| {
            info.compressed_latin1_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .and_then(|c| c.get_text().ok())
        });
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| bad(&e))?
        .to_rgb8();
    Ok(Png {
        text,
        size: img.dimensions(),
        rgb: img.into_raw(),
    })
}

/// The init image and mask files a receipt's mode needs, read and checked against the
/// hashes it records; `what` names the PNG in messages. The images go into `request`.
fn attach_edit_images(
    request: &mut GenerateRequest,
    receipt: &Receipt,
    init: Option<(&Path, Vec<u8>)>,
    mask: Option<(&Path, Vec<u8>)>,
    what: &str,
) -> Result<(), String> {
    let needs_mask = receipt.mode == Mode::Inpaint;
    match (receipt.mode, &init, &mask) {
        (Mode::Txt2Img, Some(_), _) => {
            return Err(format!(
                "{what} was made from text (Mode: txt2img): --init-image is not used"
            ));
        }
        (Mode::Img2Img | Mode::Inpaint, None, _) => {
            return Err(format!(
                "{what} was made from an init image (Mode: {}, Init image hash: {}): give it again with --init-image{}",
                receipt.mode.as_str(),
                receipt.init_image_hash.as_deref().unwrap_or("?"),
                if needs_mask { " and --mask-image" } else { "" }
            ));
        }
        (Mode::Img2Img, _, Some(_)) => {
            return Err(format!(
                "{what} was made by image-to-image without a mask (Mode: img2img): --mask-image is not used"
            ));
        }
        (Mode::Inpaint, _, None) => {
            return Err(format!(
                "{what} was made by inpainting (Mode: inpaint, Mask hash: {}): give the mask again with --mask-image",
                receipt.mask_hash.as_deref().unwrap_or("?")
            ));
        }
        _ => {}
    }
    let check = |flag: &str, file: (&Path, Vec<u8>), recorded: Option<&str>| {
        let image = ImageInput::new(file.1);
        let hash = image.short_hash();
        match recorded {
            Some(r) if r == hash => Ok(image),
            Some(r) => Err(format!(
                "{flag} {}: its hash {hash} is not the {r} that {what} records (another file, or the same picture saved again)",
                file.0.display()
            )),
            None => Err(format!("{what} records no hash for {flag}")),
        }
    };
    if let Some(file) = init {
        request.init_image = Some(check(
            "--init-image",
            file,
            receipt.init_image_hash.as_deref(),
        )?);
    }
    if let Some(file) = mask {
        request.mask_image = Some(check("--mask-image", file, receipt.mask_hash.as_deref())?);
    }
    Ok(())
}

/// The control images given again (`--control-image`), one per ControlNet the receipt's
/// request records, in order; `what` names the PNG in messages.
fn attach_control_images(
    request: &mut GenerateRequest,
    files: Vec<(&Path, Vec<u8>)>,
    what: &str,
) -> Result<(), String> {
    let controls = request
        .controls
        .as_mut()
        .map_or(&mut [][..], Vec::as_mut_slice);
    if files.len() != controls.len() {
        let names: Vec<&str> = controls
            .iter()
            .filter_map(|c| c.controlnet.as_deref())
            .collect();
        return Err(if controls.is_empty() {
            format!("{what} was made without a ControlNet: --control-image is not used")
        } else {
            format!(
                "{what} was made with {} ControlNet(s) ({}): give each one's control image again with --control-image, in that order ({} given)",
                controls.len(),
                names.join(", "),
                files.len()
            )
        });
    }
    for (control, (_, bytes)) in controls.iter_mut().zip(files) {
        control.image = Some(ImageInput::new(bytes));
    }
    Ok(())
}

/// `verify`: prints what was checked, then the verdict; a `different` image exits 1.
pub fn run(args: VerifyArgs) -> Result<(), Failure> {
    let what = args.image.display().to_string();
    let bytes = std::fs::read(&args.image).map_err(|e| format!("{what}: {e}"))?;
    let original = read_png(&bytes, &what)?;
    let text = original.text.as_deref().ok_or_else(|| {
        format!(
            "{what} has no 'parameters' chunk: not an image diffusiond made (or its metadata was stripped); nothing to verify against"
        )
    })?;
    let receipt = infotext::parse(text)
        .map_err(|e| format!("{what}: its parameters chunk is not diffusiond's: {e}"))?;
    let recorded = receipt.model_hash.clone().ok_or_else(|| {
        format!(
            "{what} records no 'Model hash' (made by diffusiond {} before images carried one): the model cannot be checked",
            receipt.diffusiond
        )
    })?;
    if let Some(l) = &receipt.latents_hash {
        return Err(format!(
            "{what} was made from initial latents given with --latents (Latents hash: {l}), not drawn from its seed: verify cannot draw them again"
        )
        .into());
    }
    let mut request = receipt.request.clone();
    attach_edit_images(
        &mut request,
        &receipt,
        read_file("--init-image", args.init_image.as_deref())?,
        read_file("--mask-image", args.mask_image.as_deref())?,
        &what,
    )?;
    let control_images = args
        .control_image
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| (p.as_path(), b))
                .map_err(|e| format!("--control-image {}: {e}", p.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    attach_control_images(&mut request, control_images, &what)?;

    let (pngs, source) = match &args.model_dir {
        Some(dir) => (
            regenerate_local(&args, dir, request, &recorded, &receipt, &what)?,
            dir.display().to_string(),
        ),
        None if args.model.is_none() && receipt.model.contains('/') => {
            return Err(format!(
                "{what} was made in-process from the folder {} (Model): give --model-dir DIR, or --model NAME for a model of the daemon",
                receipt.model
            )
            .into());
        }
        None => {
            let name = args.model.clone().unwrap_or_else(|| receipt.model.clone());
            request.model = Some(name.clone());
            (
                regenerate_daemon(&args, request)?,
                format!("the daemon's model '{name}'"),
            )
        }
    };
    let again = pngs.get(receipt.batch_pos).ok_or_else(|| {
        format!(
            "the regeneration made {} image(s), not image {} of {what}'s request",
            pngs.len(),
            receipt.batch_pos
        )
    })?;
    let again = read_png(again, "the regenerated image")?;
    let made = again
        .text
        .as_deref()
        .and_then(|t| infotext::parse(t).ok())
        .ok_or("the regenerated image has no readable parameters chunk")?;
    let hash = made.model_hash.as_deref().unwrap_or("none");
    if hash != recorded {
        return Err(model_mismatch(&what, &recorded, &source, hash).into());
    }
    println!("model hash {recorded} matches {source}");
    let (was, now) = (
        receipt.execution_provider.as_deref().unwrap_or("?"),
        made.execution_provider.as_deref().unwrap_or("?"),
    );
    let (ort_was, ort_now) = (
        receipt.onnx_runtime.as_deref().unwrap_or("?"),
        made.onnx_runtime.as_deref().unwrap_or("?"),
    );
    if was != now || ort_was != ort_now {
        println!(
            "note: made on {was} with ONNX Runtime {ort_was}, regenerated on {now} with ONNX Runtime {ort_now}: small differences are expected"
        );
    }
    let verdict = compare((original.size, &original.rgb), (again.size, &again.rgb));
    println!("{verdict}");
    if verdict.reproduced() {
        Ok(())
    } else {
        Err(format!("{what} does not match its regeneration").into())
    }
}

/// A flag's file, read.
fn read_file<'a>(
    flag: &str,
    path: Option<&'a Path>,
) -> Result<Option<(&'a Path, Vec<u8>)>, String> {
    path.map(|p| {
        std::fs::read(p)
            .map(|b| (p, b))
            .map_err(|e| format!("{flag} {}: {e}", p.display()))
    })
    .transpose()
}

fn model_mismatch(what: &str, recorded: &str, source: &str, found: &str) -> String {
    format!(
        "model hash mismatch: {what} was made with model hash {recorded}, {source} hashes to {found} (a graph, config or tokenizer file differs; docs/diffusionctl.md lists the files hashed)"
    )
}

/// Checks the folder's hash, then generates in this process (runtime settings from the
/// default config file, as `generate --local`).
fn regenerate_local(
    args: &VerifyArgs,
    dir: &Path,
    mut request: GenerateRequest,
    recorded: &str,
    receipt: &Receipt,
    what: &str,
) -> Result<Vec<Vec<u8>>, Failure> {
    if args.bus.given() {
        return Err(
            "--session, --system and --address choose the daemon's bus; not with --model-dir"
                .into(),
        );
    }
    let hashes = HashCache::for_user();
    let bundle = ModelBundle::open(dir)
        .and_then(|b| b.hashed(&hashes))
        .map_err(|e| e.to_string())?;
    hashes.save();
    let found = bundle.short_hash().unwrap_or("none");
    if found != recorded {
        return Err(model_mismatch(what, recorded, &dir.display().to_string(), found).into());
    }
    let loras = LoraCatalog::from_files(&args.lora).map_err(|e| format!("--lora: {e}"))?;
    check_lora_hashes(receipt.lora_hashes.as_deref(), &loras, what)?;
    request.model = None;
    let settings =
        Settings::load(config::default_file(false).as_deref()).map_err(|e| e.to_string())?;
    local::generate(settings.runtime, dir, &request, &loras, None, None)
        .map_err(|e| Failure::Other(e.to_string()))
}

/// Every LoRA the image's `Lora hashes` names must be among the `--lora` files, with that
/// hash (file I/O: each file's payload is hashed).
fn check_lora_hashes(
    recorded: Option<&str>,
    loras: &LoraCatalog,
    what: &str,
) -> Result<(), String> {
    for (name, hash) in lora_hashes(recorded.unwrap_or_default()) {
        let entry = loras.get(name).ok_or_else(|| {
            format!("{what} was made with LoRA {name} (Lora hashes): give its file with --lora")
        })?;
        let found = diffusiond::lora::Header::read(&entry.path)
            .map_err(|e| e.to_string())?
            .addnet_hash();
        if found != hash {
            return Err(format!(
                "LoRA hash mismatch: {what} was made with {name} of hash {hash}, {} hashes to {found}",
                entry.path.display()
            ));
        }
    }
    Ok(())
}

/// `Lora hashes` (`name: hash, …`) as pairs.
fn lora_hashes(text: &str) -> Vec<(&str, &str)> {
    text.split(", ")
        .filter_map(|item| item.rsplit_once(": "))
        .collect()
}

/// Generates through the daemon, with a progress bar (Ctrl-C cancels).
fn regenerate_daemon(args: &VerifyArgs, request: GenerateRequest) -> Result<Vec<Vec<u8>>, Failure> {
    let mut images = Vec::new();
    super::daemon(&args.bus.bus(), |client| {
        let images = &mut images;
        async move {
            let interrupt = progress::ctrl_c();
            let path = client.generate(&request).await?;
            let (result, _) =
                progress::wait_with_progress(&client, &path, None, interrupt, OnInterrupt::Cancel)
                    .await?;
            *images = result.images.unwrap_or_default();
            Ok(())
        }
    })?;
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_compare_to_the_largest_channel_difference() {
        let a = [10u8, 20, 30, 40, 50, 60];
        assert_eq!(compare(((2, 1), &a), ((2, 1), &a)), Verdict::Identical);
        let b = [10u8, 21, 30, 40, 50, 60];
        let v = compare(((2, 1), &a), ((2, 1), &b));
        assert_eq!(v.to_string(), "within 1 level (1 of 2 pixels differ)");
        assert!(v.reproduced());
        let c = [10u8, 20, 30, 40, 50, 200];
        let v = compare(((2, 1), &a), ((2, 1), &c));
        assert_eq!(
            v.to_string(),
            "different (max pixel difference 140; 1 of 2 pixels differ)"
        );
        assert!(!v.reproduced());
        let v = compare(((2, 1), &a), ((1, 2), &a));
        assert!(matches!(v, Verdict::Different { levels: 255, .. }));
    }

    fn receipt(mode: Mode) -> Receipt {
        Receipt {
            request: GenerateRequest::default(),
            mode,
            size: (64, 64),
            init_image_hash: (mode != Mode::Txt2Img)
                .then(|| ImageInput::new(b"init".to_vec()).short_hash()),
            mask_hash: (mode == Mode::Inpaint)
                .then(|| ImageInput::new(b"mask".to_vec()).short_hash()),
            latents_hash: None,
            model_hash: Some("0123456789".into()),
            lora_hashes: None,
            model: "tiny".into(),
            execution_provider: Some("cpu".into()),
            onnx_runtime: Some("1.32.0".into()),
            diffusiond: "0.1.0".into(),
            batch_pos: 0,
        }
    }

    #[test]
    fn edit_images_are_needed_exactly_when_the_mode_says_and_must_hash_the_same() {
        let p = Path::new("f.png");
        let file = |b: &[u8]| Some((p, b.to_vec()));
        let attach = |mode, init, mask| {
            let mut r = GenerateRequest::default();
            attach_edit_images(&mut r, &receipt(mode), init, mask, "x.png").map(|()| r)
        };
        assert!(attach(Mode::Txt2Img, None, None).is_ok());
        let e = attach(Mode::Txt2Img, file(b"init"), None).unwrap_err();
        assert!(e.contains("--init-image is not used"), "{e}");
        let e = attach(Mode::Img2Img, None, None).unwrap_err();
        assert!(e.contains("give it again with --init-image"), "{e}");
        let r = attach(Mode::Img2Img, file(b"init"), None).unwrap();
        assert_eq!(r.init_image, Some(ImageInput::new(b"init".to_vec())));
        let e = attach(Mode::Img2Img, file(b"other"), None).unwrap_err();
        assert!(e.contains("--init-image f.png: its hash"), "{e}");
        let e = attach(Mode::Inpaint, file(b"init"), None).unwrap_err();
        assert!(e.contains("--mask-image"), "{e}");
        let r = attach(Mode::Inpaint, file(b"init"), file(b"mask")).unwrap();
        assert!(r.mask_image.is_some());
        let e = attach(Mode::Inpaint, file(b"init"), file(b"init")).unwrap_err();
        assert!(e.contains("--mask-image f.png: its hash"), "{e}");
    }

    #[test]
    fn control_images_are_needed_one_per_recorded_controlnet() {
        use diffusiond::request::ControlInput;
        let p = Path::new("c.png");
        let recorded = |names: &[&str]| GenerateRequest {
            controls: (!names.is_empty()).then(|| {
                names
                    .iter()
                    .map(|n| ControlInput {
                        controlnet: Some(n.to_string()),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
        let mut r = recorded(&[]);
        assert!(attach_control_images(&mut r, vec![], "x.png").is_ok());
        let e = attach_control_images(&mut r, vec![(p, b"a".to_vec())], "x.png").unwrap_err();
        assert!(e.contains("without a ControlNet"), "{e}");
        let mut r = recorded(&["canny", "depth"]);
        let e = attach_control_images(&mut r, vec![(p, b"a".to_vec())], "x.png").unwrap_err();
        assert!(
            e.contains("2 ControlNet(s) (canny, depth)") && e.contains("(1 given)"),
            "{e}"
        );
        attach_control_images(
            &mut r,
            vec![(p, b"a".to_vec()), (p, b"b".to_vec())],
            "x.png",
        )
        .unwrap();
        let controls = r.controls.unwrap();
        assert_eq!(controls[1].image, Some(ImageInput::new(b"b".to_vec())));
    }
}
