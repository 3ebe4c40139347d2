//! The two towers together: shared variables, the temperature, scoring, and the weights file.
//!
//! Weights are saved as safetensors so PyTorch users can load them; tensor names follow the
//! module fields (`item.title_emb.weight`, `user.gru.weight_ih_l0`, ...), listed in
//! `docs/architecture.md`.

use std::path::Path;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};

use crate::config::TowerConfig;
use crate::error::{Error, Result};
use crate::inputs::{ItemInputs, UserInputs};
use crate::item::{Hiding, ItemEncoder};
use crate::user::UserEncoder;

/// Lowest and highest temperature a learned temperature may reach.
pub const TEMPERATURE_RANGE: (f64, f64) = (0.01, 1.0);

/// Item tower, user tower and temperature, with their variables in one store.
pub struct TwoTower {
    pub vs: VarStore,
    pub item: ItemEncoder,
    pub user: UserEncoder,
    log_temperature: Tensor,
    pub config: TowerConfig,
}

impl TwoTower {
    /// A freshly initialised model on `device`.
    pub fn new(config: TowerConfig, device: Device) -> Result<TwoTower> {
        config.validate()?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let item = ItemEncoder::new(&root / "item", &config);
        let user = UserEncoder::new(&root / "user", &config);
        let init = nn::Init::Const(config.temperature.ln());
        let log_temperature = if config.learn_temperature {
            root.var("log_temperature", &[], init)
        } else {
            let mut t = root.zeros_no_train("log_temperature", &[]);
            let _ = tch::no_grad(|| t.fill_(config.temperature.ln()));
            t
        };
        Ok(TwoTower {
            vs,
            item,
            user,
            log_temperature,
            config,
        })
    }

    /// Loads weights saved by [`save`](Self::save) into a model built from `config`.
    pub fn load(config: TowerConfig, weights: &Path, device: Device) -> Result<TwoTower> {
        if !weights.is_file() {
            return Err(Error::ModelFile {
                path: weights.to_path_buf(),
                reason: "missing".into(),
            });
        }
        let mut model = TwoTower::new(config, device)?;
        model.vs.load(weights).map_err(|e| Error::ModelFile {
            path: weights.to_path_buf(),
            reason: format!("cannot load weights: {e}"),
        })?;
        Ok(model)
    }

    /// Saves the weights as safetensors, atomically (temporary file, then rename).
    pub fn save(&self, weights: &Path) -> Result<()> {
        let tmp = weights.with_extension("tmp.safetensors");
        self.vs.save(&tmp).map_err(|e| Error::ModelFile {
            path: tmp.clone(),
            reason: e.to_string(),
        })?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, weights))
            .map_err(|e| Error::ModelFile {
                path: weights.to_path_buf(),
                reason: e.to_string(),
            })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The softmax temperature, within [`TEMPERATURE_RANGE`] (a scalar tensor).
    pub fn temperature(&self) -> Tensor {
        let (lo, hi) = TEMPERATURE_RANGE;
        self.log_temperature.exp().clamp(lo, hi)
    }

    /// `[N, dim]` item vectors.
    pub fn encode_items(&self, items: &ItemInputs, train: bool) -> Tensor {
        self.item.forward(items, train)
    }

    /// `[N, dim]` item vectors with the id-like inputs hidden as `hiding` says.
    pub fn encode_items_hiding(&self, items: &ItemInputs, train: bool, hiding: Hiding) -> Tensor {
        self.item.forward_hiding(items, train, hiding)
    }

    /// `[B, dim]` user vectors; `item_vecs` are the vectors of the items the histories point at.
    pub fn encode_users(&self, users: &UserInputs, item_vecs: &Tensor, train: bool) -> Tensor {
        self.user
            .forward(users, item_vecs, &self.item.title_emb, train)
    }

    /// `[B, N]` logits: dot products divided by the temperature.
    pub fn logits(&self, users: &Tensor, items: &Tensor) -> Tensor {
        users.matmul(&items.tr()) / self.temperature()
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// Names and shapes of every saved tensor, sorted (documentation and checks).
    pub fn tensor_names(&self) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<_> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VocabSizes;
    use crate::inputs::{EventInput, ItemBatchHost, ItemTokens, UserBatchHost, UserInput};

    fn small_config() -> TowerConfig {
        TowerConfig {
            dim: 8,
            token_dim: 8,
            aspect_dim: 4,
            category_dim: 4,
            item_hidden: vec![16],
            gru_hidden: 8,
            user_hidden: vec![16],
            dropout: 0.0,
            vocab: VocabSizes {
                title: 50,
                aspects: 10,
                categories: 10,
                user_features: 10,
                item_ids: 8,
                title_buckets: 10,
            },
            ..Default::default()
        }
    }

    fn items() -> Vec<ItemTokens> {
        vec![
            ItemTokens {
                title: vec![1, 2],
                aspects: vec![3],
                categories: vec![1, 2],
                id: 0,
            },
            ItemTokens {
                title: vec![4],
                aspects: vec![],
                categories: vec![3],
                id: 0,
            },
            // A brand-new item with only hash-bucket words still gets a vector.
            ItemTokens {
                title: vec![45, 46],
                aspects: vec![9],
                categories: vec![9],
                id: 0,
            },
        ]
    }

    fn users() -> Vec<UserInput> {
        let ev = |row: Option<i64>, query: Vec<i64>| EventInput {
            event_type: 1,
            item_row: row,
            query,
            gap_s: 100,
        };
        vec![
            UserInput {
                history: vec![
                    ev(Some(0), vec![]),
                    ev(None, vec![5, 6]),
                    ev(Some(1), vec![]),
                ],
                hour: 3,
                weekday: 1,
                user_features: vec![2],
            },
            UserInput {
                history: vec![],
                hour: 23,
                weekday: 6,
                user_features: vec![],
            },
        ]
    }

    fn item_vectors(model: &TwoTower) -> Tensor {
        let tokens = items();
        let refs: Vec<&ItemTokens> = tokens.iter().collect();
        model.encode_items(
            &ItemBatchHost::new(&refs, &model.config).to_device(Device::Cpu),
            false,
        )
    }

    #[test]
    fn towers_output_unit_vectors_even_for_new_items_and_empty_histories() {
        let model = TwoTower::new(small_config(), Device::Cpu).unwrap();
        let iv = item_vectors(&model);
        let uv = model.encode_users(
            &UserBatchHost::new(&users(), &model.config).to_device(Device::Cpu),
            &iv,
            false,
        );
        for v in [&iv, &uv] {
            let norms = v.norm_scalaropt_dim(2, [-1], false);
            assert!(
                norms.allclose(&Tensor::ones_like(&norms), 1e-5, 1e-5, false),
                "{norms}"
            );
        }
        assert_eq!(model.logits(&uv, &iv).size(), [2, 3]);
    }

    #[test]
    fn item_ids_separate_content_twins_and_unseen_items_get_the_content_vector() {
        let cfg = TowerConfig {
            item_id_dim: 4,
            item_id_dropout: 1.0,
            ..small_config()
        };
        let model = TwoTower::new(cfg, Device::Cpu).unwrap();
        let twin = |id| ItemTokens {
            title: vec![1, 2],
            aspects: vec![3],
            categories: vec![1],
            id,
        };
        let tokens = [twin(1), twin(2), twin(0)];
        let refs: Vec<&ItemTokens> = tokens.iter().collect();
        let inputs = ItemBatchHost::new(&refs, &model.config).to_device(Device::Cpu);
        let v = model.encode_items(&inputs, false);
        assert!(
            !v.get(0).allclose(&v.get(1), 1e-3, 1e-3, false),
            "twins differ"
        );
        // Training with every id hidden sees exactly what an unseen item (id 0) gets.
        let hidden = model.encode_items(&inputs, true);
        for row in 0..3 {
            assert!(hidden.get(row).allclose(&v.get(2), 1e-6, 1e-6, false));
        }
    }

    #[test]
    fn an_unseen_item_is_not_embedded_as_the_seen_item_its_rare_word_shares_a_bucket_with() {
        let cfg = TowerConfig {
            item_id_dim: 4,
            item_id_dropout: 0.0,
            hashed_word_dropout: 1.0,
            ..small_config()
        };
        let model = TwoTower::new(cfg, Device::Cpu).unwrap();
        // Title ids 40..50 are the hash buckets of `small_config` (50 rows, 10 buckets).
        let item = |title: Vec<i64>, id| ItemTokens {
            title,
            aspects: vec![3],
            categories: vec![1],
            id,
        };
        let tokens = [
            item(vec![1, 45], 1),
            item(vec![1], 1),
            item(vec![1, 45], 0),
            item(vec![1], 0),
        ];
        let refs: Vec<&ItemTokens> = tokens.iter().collect();
        let inputs = ItemBatchHost::new(&refs, &model.config).to_device(Device::Cpu);
        let v = model.encode_items(&inputs, false);
        let same = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-6, 1e-6, false);
        assert!(
            !same(&v.get(0), &v.get(1)),
            "a seen item keeps its rare word"
        );
        assert!(same(&v.get(2), &v.get(3)), "an unseen item drops it");
        // Training with every rare word hidden sees what an unseen item gets.
        let hidden = model.encode_items(&inputs, true);
        assert!(same(&hidden.get(0), &v.get(1)));
    }

    #[test]
    fn padding_never_changes_a_users_vector() {
        let model = TwoTower::new(small_config(), Device::Cpu).unwrap();
        let iv = item_vectors(&model);
        let short = UserInput {
            history: users()[0].history[..1].to_vec(),
            ..users()[0].clone()
        };
        let alone = model.encode_users(
            &UserBatchHost::new(std::slice::from_ref(&short), &model.config).to_device(Device::Cpu),
            &iv,
            false,
        );
        // Batched with a longer history, the short one is right-padded to length 3.
        let batched = model.encode_users(
            &UserBatchHost::new(&[short, users()[0].clone()], &model.config).to_device(Device::Cpu),
            &iv,
            false,
        );
        assert!(alone.get(0).allclose(&batched.get(0), 1e-5, 1e-5, false));
    }

    #[test]
    fn save_and_load_round_trip_and_missing_or_corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let model = TwoTower::new(small_config(), Device::Cpu).unwrap();
        model.save(&path).unwrap();
        let back = TwoTower::load(small_config(), &path, Device::Cpu).unwrap();
        let loaded = back.vs.variables();
        assert_eq!(loaded.len(), model.vs.variables().len());
        for (name, t) in model.vs.variables() {
            assert!(t.equal(&loaded[&name]), "{name}");
        }
        assert!(model
            .tensor_names()
            .iter()
            .any(|(n, _)| n == "item.title_emb.weight"));
        let missing = TwoTower::load(
            small_config(),
            &dir.path().join("nope.safetensors"),
            Device::Cpu,
        );
        assert!(missing.err().unwrap().to_string().contains("missing"));
        std::fs::write(&path, b"not safetensors").unwrap();
        let corrupt = TwoTower::load(small_config(), &path, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            corrupt.contains("model.safetensors") && corrupt.contains("cannot load"),
            "{corrupt}"
        );
    }
}
