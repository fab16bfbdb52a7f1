//! LoRA sets in the engine. A request with LoRAs runs on its own loaded model: the
//! model's sessions with the set's merged weights, in a slot keyed by the request's
//! [`ResolvedRequest::model_key`] (`tiny+lora:style=0.8`). Jobs batch together only with
//! the same key. The slot is made when the first job for the set is queued and forgotten
//! once no queued job asks for it and no worker holds it; a set is unloaded like a model
//! (`keep_alive`, `jobs.idle_unload_secs`), and, with a memory budget, the least recently
//! used idle sets of a worker make room for a new one.

use std::collections::{HashMap, HashSet};

use super::{Engine, State};
use crate::lora::LoraSpec;
use crate::request::ResolvedRequest;

/// Model keys with a LoRA set → (the model's name, its LoRAs).
pub(super) type LoraSets = HashMap<String, (String, Vec<LoraSpec>)>;

/// Makes a slot for the LoRA set of a job about to be queued (nothing for a plain job).
pub(super) fn register(st: &mut State, r: &ResolvedRequest) {
    if r.loras.is_empty() {
        return;
    }
    let key = r.model_key().into_owned();
    st.slots.ensure(&key);
    st.lora_sets
        .entry(key)
        .or_insert_with(|| (r.model.clone(), r.loras.clone()));
}

/// What a slot key loads: the model's name and the LoRAs to merge (none for a model).
pub(super) fn target(st: &State, key: &str) -> (String, Vec<LoraSpec>) {
    st.lora_sets
        .get(key)
        .cloned()
        .unwrap_or_else(|| (key.to_string(), Vec::new()))
}

/// The slot keys of `model`'s LoRA sets.
pub(super) fn keys_of(st: &State, model: &str) -> Vec<String> {
    st.lora_sets
        .iter()
        .filter(|(_, (m, _))| m == model)
        .map(|(k, _)| k.clone())
        .collect()
}

/// Forgets the sets no queued job asks for and no worker holds or loads.
pub(super) fn prune(st: &mut State) {
    if st.lora_sets.is_empty() {
        return;
    }
    let queued: HashSet<String> = st
        .queue
        .iter()
        .filter(|j| !j.request.loras.is_empty())
        .map(|j| j.request.model_key().into_owned())
        .collect();
    let gone: Vec<String> = st
        .lora_sets
        .keys()
        .filter(|k| !queued.contains(*k) && st.slots.is_unloaded_everywhere(k))
        .cloned()
        .collect();
    for key in gone {
        st.lora_sets.remove(&key);
        st.slots.remove(&key);
    }
}

impl Engine {
    /// Before a LoRA set of `model` loads on `worker`: with a memory budget, unloads the
    /// least recently used idle LoRA sets of that worker while the weights it holds (or
    /// loads) and the new set's would pass the budget. Models without LoRAs stay.
    pub(super) fn make_room_for_set(&self, st: &mut State, model: &str, worker: usize) {
        let Some(budget) = self.shared.memory_budget else {
            return;
        };
        let weights = |key: &str| -> u64 {
            let model = st.lora_sets.get(key).map_or(key, |(m, _)| m.as_str());
            self.memory_profile(model).map_or(0, |p| p.weights_bytes)
        };
        let new = weights(model);
        loop {
            let resident: u64 = st.slots.resident_on(worker).map(&weights).sum();
            if resident.saturating_add(new) <= budget {
                return;
            }
            let Some(victim) = st
                .slots
                .lru_ready_on(worker, |k| st.lora_sets.contains_key(k))
            else {
                return;
            };
            tracing::info!(
                model = %victim,
                worker,
                "unloading the least recently used LoRA set to make room for another"
            );
            st.slots.unload_on(&victim, worker);
        }
    }

    /// The LoRA sets of `model` loaded on some worker, as `name=scale,…` lists.
    pub fn loaded_lora_sets(&self, model: &str) -> Vec<String> {
        let st = self.lock();
        let prefix = format!("{model}{}", crate::request::LORA_SET);
        let mut sets: Vec<String> = keys_of(&st, model)
            .into_iter()
            .filter(|k| st.slots.state(k) == super::ModelState::Loaded)
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect();
        sets.sort();
        sets
    }
}
