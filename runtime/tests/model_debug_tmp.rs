use cathedral_runtime::loader::{load_model, LoadOptions};
use cathedral_runtime::tiny::{write_tiny_model, TinyDtype, TinyModelArgs};
use mlx_rs::{Array, Dtype};
#[test]
fn dump() {
    let dir = std::path::PathBuf::from("/tmp/tm/dbg_bf16");
    write_tiny_model(&TinyModelArgs { out: dir.clone(), seed: 0, dtype: TinyDtype::Bf16, q_bits: None, q_group_size: 32 }).unwrap();
    let model = load_model(&dir, LoadOptions { vision: true }).unwrap();
    let r = Array::load_safetensors(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/reference.safetensors")).unwrap();
    let u8s = &r["image64.f32.pixel_u8"];
    let pixels = u8s.as_dtype(Dtype::Float32).unwrap().divide(Array::from_f32(255.0)).unwrap().subtract(Array::from_f32(0.5)).unwrap().divide(Array::from_f32(0.5)).unwrap();
    let tower = model.vision_tower.as_ref().unwrap();
    let f = tower.forward(&pixels, &[[1, 16, 16]]).unwrap().as_dtype(Dtype::Float32).unwrap();
    let ids: Vec<u32> = r["image64.f32.input_ids"].as_slice::<i32>().iter().map(|&x| x as u32).collect();
    let (pos, _next) = cathedral_runtime::vision::mrope_position_ids(&ids, &[[1, 16, 16]], 248056, 2).unwrap();
    let lm = &model.language_model;
    let v: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let len = v.len() as i32;
    let embeds = lm.embed(&Array::from_slice(&v, &[1, len])).unwrap();
    let fe = tower.forward(&pixels, &[[1, 16, 16]]).unwrap();
    let embeds = cathedral_runtime::engine::splice_features(&embeds, &fe, &ids, 248056).unwrap();
    let flat: Vec<i32> = (0..3).flat_map(|a| pos.iter().map(move |p| p[a])).collect();
    let mut cache = lm.new_cache();
    let logits = lm.forward(&embeds, &Array::from_slice(&flat, &[3, len]), &mut cache, cathedral_runtime::model::LogitsScope::All).unwrap();
    let mut m = std::collections::HashMap::new();
    {
        let positions = Array::from_slice(&flat, &[3, len]);
        let (cos, sin) = lm.rope.cos_sin(&positions, embeds.dtype()).unwrap();
        let mut cache2 = lm.new_cache();
        let mut h = embeds.clone();
        for (i, (layer, c)) in lm.model.layers.iter().zip(cache2.iter_mut()).enumerate() {
            let normed = layer.input_layernorm.forward(&h).unwrap();
            let r = match c {
                cathedral_runtime::model::LayerCache::Linear(c) => layer.linear_attn.as_ref().unwrap().forward(&normed, c).unwrap(),
                cathedral_runtime::model::LayerCache::Attention(c) => layer.self_attn.as_ref().unwrap().forward(&normed, &lm.rope, &cos, &sin, c).unwrap(),
            };
            m.insert(format!("mix{i}"), r.as_dtype(Dtype::Float32).unwrap());
            h = layer.forward(&h, &lm.rope, &cos, &sin, &mut lm.new_cache().remove(i)).unwrap();
            m.insert(format!("h{i}"), h.as_dtype(Dtype::Float32).unwrap());
        }
    }
    m.insert("logits".to_string(), logits.as_dtype(Dtype::Float32).unwrap());
    m.insert("embeds".to_string(), embeds.as_dtype(Dtype::Float32).unwrap());
    m.insert("features".to_string(), f);
    m.insert("pixels".to_string(), pixels);
    Array::save_safetensors(m, None, "/tmp/tm/rust_bf16.safetensors").unwrap();
}
