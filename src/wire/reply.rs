//! The reply dicts of the D-Bus API: `Job.Wait()`'s result and `Manager.ListModels()`'s
//! model entries. The daemon writes them ([`WaitResult`], [`ModelInfo`]); the client reads
//! them ([`JobResult`], [`ModelInfo`]); tests read one as the other.
//!
//! `WaitResult` is serialized field by field: building it as a `HashMap<String, OwnedValue>`
//! would turn every byte of every PNG into a `Value` of its own (zvariant's arrays hold one
//! `Value` per element), megabytes of enum values per job at 512×512. Here each field is
//! written as a variant straight from the job's output, and each PNG as one `ay` block.

use std::collections::HashMap;
use std::sync::Arc;

use serde::ser::{SerializeSeq, Serializer};
use zbus::zvariant::{DeserializeDict, Signature, Type, as_value};

use crate::jobs::JobOutput;

/// What `Wait()` returns for a job that succeeded.
#[derive(Debug, serde::Serialize, Type)]
#[zvariant(signature = "a{sv}")]
pub struct WaitResult {
    /// Always `succeeded`.
    #[serde(with = "as_value")]
    pub state: String,
    /// The PNG files (none when they went to `output_fds`).
    #[serde(with = "as_value")]
    pub images: Pngs,
    /// The seed used.
    #[serde(with = "as_value")]
    pub seed: u64,
    /// The scheduler used.
    #[serde(with = "as_value")]
    pub scheduler: String,
    /// The model's name.
    #[serde(with = "as_value")]
    pub model: String,
    /// Image width.
    #[serde(with = "as_value")]
    pub width: u32,
    /// Image height.
    #[serde(with = "as_value")]
    pub height: u32,
    /// Denoising steps.
    #[serde(with = "as_value")]
    pub steps: u32,
    /// Images in the UNet batch the job ran in.
    #[serde(with = "as_value")]
    pub batch_size: u32,
    /// The worker's device the batch ran on (`cpu`, `cpu#1`, `cuda:0`, ...).
    #[serde(with = "as_value")]
    pub device: String,
    /// Seconds per phase.
    #[serde(with = "as_value")]
    pub timings: HashMap<String, f64>,
}

/// A job's PNGs, serialized as `aay` from the shared output without copying.
#[derive(Debug)]
pub struct Pngs(pub Arc<JobOutput>);

impl serde::Serialize for Pngs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let pngs = &self.0.pngs;
        let mut seq = serializer.serialize_seq(Some(pngs.len()))?;
        for png in pngs {
            seq.serialize_element(&Bytes(png))?;
        }
        seq.end()
    }
}

impl Type for Pngs {
    const SIGNATURE: &'static Signature = <Vec<Vec<u8>> as Type>::SIGNATURE;
}

/// One PNG written as a single byte block (`serialize_bytes`), not byte by byte.
struct Bytes<'a>(&'a [u8]);

impl serde::Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// The `timings` entry: seconds per phase.
pub fn timings(out: &JobOutput) -> HashMap<String, f64> {
    let t = &out.timings;
    [
        ("queued", out.queued_secs),
        ("text_encoder", t.text_encoder.as_secs_f64()),
        ("unet", t.unet.as_secs_f64()),
        ("scheduler", t.scheduler.as_secs_f64()),
        ("vae", t.vae.as_secs_f64()),
        ("png", out.png_secs),
        ("total", out.total_secs),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// What `Job.Wait()` returns, as the client reads it (keys the daemon leaves out read as
/// `None`).
#[derive(Debug, Clone, Default, DeserializeDict, Type)]
#[zvariant(signature = "a{sv}")]
pub struct JobResult {
    /// The job's final state.
    pub state: Option<String>,
    /// The PNG files (empty when `output_fds` was given).
    pub images: Option<Vec<Vec<u8>>>,
    /// The seed used.
    pub seed: Option<u64>,
    /// The scheduler used.
    pub scheduler: Option<String>,
    /// The model used.
    pub model: Option<String>,
    /// Image width.
    pub width: Option<u32>,
    /// Image height.
    pub height: Option<u32>,
    /// Denoising steps.
    pub steps: Option<u32>,
    /// Seconds per phase (`queued`, `text_encoder`, `unet`, `scheduler`, `vae`, `png`, `total`).
    pub timings: Option<HashMap<String, f64>>,
    /// Images in the UNet batch this job ran in.
    pub batch_size: Option<u32>,
    /// The worker's device the batch ran on (`runtime.devices`).
    pub device: Option<String>,
}

/// One configured model, as `ListModels` describes it. Keys a reader does not find read
/// as empty.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, Type)]
#[zvariant(signature = "a{sv}")]
#[serde(default)]
pub struct ModelInfo {
    /// Its name in the config.
    #[serde(with = "as_value")]
    pub name: String,
    /// Its folder.
    #[serde(with = "as_value")]
    pub path: String,
    /// Whether it is loaded now.
    #[serde(with = "as_value")]
    pub loaded: bool,
    /// Whether requests without `model` use it.
    #[serde(with = "as_value")]
    pub default: bool,
    /// `sd`, `sdxl`, or `unreadable` when its folder could not be opened.
    #[serde(with = "as_value")]
    pub kind: String,
    /// Its default scheduler (empty when the folder's is not one diffusiond knows).
    #[serde(with = "as_value")]
    pub scheduler: String,
    /// `unloaded`, `loading`, `building` (loading with the TensorRT provider in use, which
    /// builds its engines then unless they are cached), `loaded` or `failed`.
    #[serde(with = "as_value")]
    pub state: String,
    /// Why the folder could not be opened (`kind` `unreadable`): the message names the
    /// file and what is wrong with it. Empty for a model that opened.
    #[serde(with = "as_value")]
    pub error: String,
    /// A loaded model's seconds left before it is unloaded (its last job's `keep_alive`,
    /// else `jobs.idle_unload_secs`), -1 for never. Absent when it is not loaded.
    #[serde(
        with = "as_value::optional",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub expires_in: Option<f64>,
    /// A loaded model's estimated resident bytes (its weights, per worker). Absent when it
    /// is not loaded.
    #[serde(
        with = "as_value::optional",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub memory_bytes: Option<u64>,
    /// The LoRA sets loaded for it, each `name=scale,…` (a request's `loras`, sorted by
    /// name): each is a loaded copy of the model with those weights merged.
    #[serde(with = "as_value")]
    pub lora_sets: Vec<String>,
    /// The ControlNets requests may name in `controls` (the folders under its
    /// `controlnet/`), sorted; empty when it has none or could not be opened.
    #[serde(with = "as_value")]
    pub controlnets: Vec<String>,
}

/// One LoRA file a model may use, as `ListLoras` describes it. Keys a reader does not
/// find read as empty.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, Type)]
#[zvariant(signature = "a{sv}")]
#[serde(default)]
pub struct LoraInfo {
    /// The name requests use: the file name without `.safetensors`.
    #[serde(with = "as_value")]
    pub name: String,
    /// The file's size in bytes.
    #[serde(with = "as_value")]
    pub size: u64,
    /// A1111's short hash (`Lora hashes`): the first 12 hex digits of the SHA-256 of the
    /// tensor data after the header.
    #[serde(with = "as_value")]
    pub hash: String,
    /// The base model it was made for (`sd1`, `sd2`, `sdxl`, or its metadata's words);
    /// empty when unknown.
    #[serde(with = "as_value")]
    pub architecture: String,
    /// Whether it applies to this model (every key maps to a weight that fits).
    #[serde(with = "as_value")]
    pub fits: bool,
    /// Its trigger words (`modelspec.trigger_phrase`, or the most frequent training tags).
    #[serde(with = "as_value")]
    pub trigger_words: Vec<String>,
    /// Why it does not apply or cannot be read (names the file and the key); empty when
    /// it fits.
    #[serde(with = "as_value")]
    pub error: String,
}

/// A model's `state` in `ListModels`: a load with the TensorRT provider in use is
/// `building` (its engines are built then, unless the cache holds them).
pub fn model_state_name(state: crate::jobs::ModelState, tensorrt: bool) -> &'static str {
    use crate::jobs::ModelState;
    match state {
        ModelState::Unloaded => "unloaded",
        ModelState::Loading if tensorrt => "building",
        ModelState::Loading => "loading",
        ModelState::Loaded => "loaded",
        ModelState::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::StageTimings;
    use std::time::Duration;
    use zbus::zvariant::{LE, OwnedValue, serialized::Context, to_bytes};

    fn output() -> Arc<JobOutput> {
        Arc::new(JobOutput {
            pngs: vec![vec![0x89, b'P', b'N', b'G', 0, 255], vec![], vec![7; 1000]],
            scheduler: "pndm".into(),
            timings: StageTimings {
                unet: Duration::from_millis(1500),
                ..Default::default()
            },
            queued_secs: 0.25,
            png_secs: 0.5,
            total_secs: 2.0,
            batch_images: 3,
            device: "cuda:1".into(),
        })
    }

    fn result(out: Arc<JobOutput>) -> WaitResult {
        WaitResult {
            state: "succeeded".into(),
            timings: timings(&out),
            images: Pngs(out),
            seed: 42,
            scheduler: "pndm".into(),
            model: "tiny".into(),
            width: 64,
            height: 96,
            steps: 13,
            batch_size: 3,
            device: "cuda:1".into(),
        }
    }

    #[test]
    fn reads_back_as_a_plain_dict_of_variants() {
        let out = output();
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &result(out.clone())).expect("serializes");
        let (dict, _): (HashMap<String, OwnedValue>, _) =
            bytes.deserialize().expect("reads back as a{sv}");
        assert_eq!(WaitResult::SIGNATURE.to_string(), "a{sv}");
        let images: Vec<Vec<u8>> = dict["images"].try_clone().unwrap().try_into().unwrap();
        assert_eq!(images, out.pngs);
        let get_u32 = |k: &str| u32::try_from(&dict[k]).unwrap();
        assert_eq!(
            (get_u32("width"), get_u32("height"), get_u32("steps")),
            (64, 96, 13)
        );
        assert_eq!(get_u32("batch_size"), 3);
        assert_eq!(u64::try_from(&dict["seed"]).unwrap(), 42);
        assert_eq!(<&str>::try_from(&dict["state"]).unwrap(), "succeeded");
        assert_eq!(<&str>::try_from(&dict["scheduler"]).unwrap(), "pndm");
        assert_eq!(<&str>::try_from(&dict["model"]).unwrap(), "tiny");
        let t: HashMap<String, f64> = dict["timings"].try_clone().unwrap().try_into().unwrap();
        assert_eq!(t["unet"], 1.5);
        assert_eq!(t["total"], 2.0);
        assert_eq!(t["queued"], 0.25);
        assert_eq!(t.len(), 7);
        assert_eq!(<&str>::try_from(&dict["device"]).unwrap(), "cuda:1");
        assert_eq!(dict.len(), 11);
    }

    #[test]
    fn reads_back_as_the_clients_struct() {
        let out = output();
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &result(out.clone())).expect("serializes");
        let (r, _): (JobResult, _) = bytes.deserialize().expect("reads back");
        assert_eq!(r.images.as_deref(), Some(&out.pngs[..]));
        assert_eq!(r.seed, Some(42));
        assert_eq!(r.batch_size, Some(3));
        assert_eq!(r.timings.map(|t| t["png"]), Some(0.5));
    }
    #[test]
    fn model_states_have_one_name_each() {
        use crate::jobs::ModelState::*;
        let names: Vec<_> = [Unloaded, Loading, Loaded, Failed]
            .into_iter()
            .map(|s| model_state_name(s, false))
            .collect();
        assert_eq!(names, ["unloaded", "loading", "loaded", "failed"]);
        assert_eq!(model_state_name(Loading, true), "building");
        assert_eq!(model_state_name(Loaded, true), "loaded");
    }

    #[test]
    fn model_info_reads_back_as_a_plain_dict() {
        let info = ModelInfo {
            name: "tiny".into(),
            path: "/m".into(),
            loaded: true,
            default: false,
            kind: "sd".into(),
            scheduler: "pndm".into(),
            state: "loaded".into(),
            error: String::new(),
            expires_in: Some(-1.0),
            memory_bytes: Some(1 << 30),
            lora_sets: vec!["style=0.8".into()],
            controlnets: vec!["canny".into(), "depth".into()],
        };
        let unloaded = ModelInfo {
            name: "other".into(),
            ..ModelInfo::default()
        };
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &vec![info.clone(), unloaded.clone()]).expect("serializes");
        let (dicts, _): (Vec<HashMap<String, OwnedValue>>, _) = bytes.deserialize().unwrap();
        assert_eq!(<&str>::try_from(&dicts[0]["name"]).unwrap(), "tiny");
        assert!(bool::try_from(&dicts[0]["loaded"]).unwrap());
        assert_eq!(f64::try_from(&dicts[0]["expires_in"]).unwrap(), -1.0);
        assert_eq!(u64::try_from(&dicts[0]["memory_bytes"]).unwrap(), 1 << 30);
        let sets: Vec<String> = dicts[0]["lora_sets"]
            .try_clone()
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(sets, ["style=0.8"]);
        let controlnets: Vec<String> = dicts[0]["controlnets"]
            .try_clone()
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(controlnets, ["canny", "depth"]);
        assert_eq!(dicts[0]["controlnets"].value_signature().to_string(), "as");
        assert_eq!(dicts[0].len(), 12);
        assert_eq!(dicts[1].len(), 10, "no expiry or memory when not loaded");
        let (back, _): (Vec<ModelInfo>, _) = bytes.deserialize().unwrap();
        assert_eq!(back, vec![info, unloaded]);
    }

    #[test]
    fn lora_info_reads_back_as_a_plain_dict() {
        let info = LoraInfo {
            name: "style".into(),
            size: 4096,
            hash: "0123456789ab".into(),
            architecture: "sdxl".into(),
            fits: true,
            trigger_words: vec!["zzz".into()],
            error: String::new(),
        };
        let ctxt = Context::new_dbus(LE, 0);
        let bytes = to_bytes(ctxt, &vec![info.clone()]).expect("serializes");
        let (dicts, _): (Vec<HashMap<String, OwnedValue>>, _) = bytes.deserialize().unwrap();
        assert_eq!(u64::try_from(&dicts[0]["size"]).unwrap(), 4096);
        assert!(bool::try_from(&dicts[0]["fits"]).unwrap());
        let (back, _): (Vec<LoraInfo>, _) = bytes.deserialize().unwrap();
        assert_eq!(back, vec![info]);
    }
}
