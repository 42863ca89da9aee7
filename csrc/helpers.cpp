// Dataset index helpers for moecore.data, bound with pybind11 as ``moecore.data._helpers``.
//
// Both functions follow Megatron-LM's megatron/core/datasets/helpers.cpp contracts so that
// indices (and therefore the sample order of a training run) match Megatron's exactly. The
// pure-numpy references live in moecore/data/sample_index.py and blending.py; the unit tests
// check both give identical results.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Walks the epoch-concatenated document order once, recording where every sample starts.
// Row i of out ([num_samples + 1, 2]) is (index into doc_idx, token offset in that document);
// sample i spans row i to row i + 1 inclusive, i.e. seq_length + 1 tokens, so consecutive
// samples share one token (the last label of sample i is the first input of sample i + 1).
template <typename DocT>
void fill_sample_idx(const int32_t *sizes, int64_t num_docs, const DocT *doc_idx,
                     int64_t doc_idx_len, int64_t seq_length, int64_t num_samples, int64_t *out,
                     std::string *error) {
  int64_t sample_index = 0;
  int64_t doc_idx_index = 0;
  int64_t doc_offset = 0;
  out[0] = 0;
  out[1] = 0;
  ++sample_index;
  while (sample_index <= num_samples) {
    // seq_length + 1: a sample carries its inputs plus the one extra label token.
    int64_t remaining_seq_length = seq_length + 1;
    while (remaining_seq_length != 0) {
      if (doc_idx_index >= doc_idx_len) {
        *error = "ran past the end of doc_idx (length " + std::to_string(doc_idx_len) +
                 ") while building sample " + std::to_string(sample_index - 1) +
                 ": tokens_per_epoch * num_epochs exceeds the tokens in doc_idx";
        return;
      }
      const int64_t doc_id = static_cast<int64_t>(doc_idx[doc_idx_index]);
      if (doc_id < 0 || doc_id >= num_docs) {
        *error = "doc_idx[" + std::to_string(doc_idx_index) + "] = " + std::to_string(doc_id) +
                 " is outside sizes (length " + std::to_string(num_docs) + ")";
        return;
      }
      const int64_t doc_length = static_cast<int64_t>(sizes[doc_id]) - doc_offset;
      remaining_seq_length -= doc_length;
      if (remaining_seq_length <= 0) {
        // The sample ends inside this document; the -1 makes the end token shared with the
        // next sample, which starts exactly there.
        doc_offset += remaining_seq_length + doc_length - 1;
        remaining_seq_length = 0;
      } else {
        ++doc_idx_index;
        doc_offset = 0;
      }
    }
    out[2 * sample_index] = doc_idx_index;
    out[2 * sample_index + 1] = doc_offset;
    ++sample_index;
  }
}

py::array_t<int64_t> build_sample_idx(
    const py::array_t<int32_t, py::array::c_style | py::array::forcecast> &sizes,
    const py::array &doc_idx, int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch) {
  if (seq_length < 1) {
    throw std::invalid_argument("seq_length must be >= 1, got " + std::to_string(seq_length));
  }
  if (num_epochs < 1) {
    throw std::invalid_argument("num_epochs must be >= 1, got " + std::to_string(num_epochs));
  }
  if (tokens_per_epoch < 1) {
    throw std::invalid_argument("tokens_per_epoch must be >= 1, got " +
                                std::to_string(tokens_per_epoch));
  }
  if (sizes.ndim() != 1 || doc_idx.ndim() != 1) {
    throw std::invalid_argument("sizes and doc_idx must be 1-D arrays");
  }
  const bool is_i32 = py::isinstance<py::array_t<int32_t>>(doc_idx);
  const bool is_i64 = py::isinstance<py::array_t<int64_t>>(doc_idx);
  if (!is_i32 && !is_i64) {
    throw std::invalid_argument("doc_idx must be an int32 or int64 array, got dtype " +
                                std::string(py::str(doc_idx.dtype())));
  }
  // Keeps a contiguous view alive; a no-op for the usual contiguous input.
  py::array doc_c = py::array::ensure(doc_idx, py::array::c_style);

  // Megatron's count: the last sample must still have its extra label token.
  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;
  py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
  int64_t *out = result.mutable_data();
  const int32_t *sizes_ptr = sizes.data();
  const int64_t num_docs = sizes.shape(0);
  const int64_t doc_len = doc_c.shape(0);
  const void *doc_ptr = doc_c.data();
  std::string error;
  {
    py::gil_scoped_release release;
    if (is_i32) {
      fill_sample_idx(sizes_ptr, num_docs, static_cast<const int32_t *>(doc_ptr), doc_len,
                      seq_length, num_samples, out, &error);
    } else {
      fill_sample_idx(sizes_ptr, num_docs, static_cast<const int64_t *>(doc_ptr), doc_len,
                      seq_length, num_samples, out, &error);
    }
  }
  if (!error.empty()) {
    throw std::invalid_argument(error);
  }
  return result;
}

// Megatron's greedy blending: each position goes to the dataset whose realised count lags its
// target share (weight * position) the most, so every prefix of the blend tracks the weights.
py::tuple build_blending_indices(
    const py::array_t<double, py::array::c_style | py::array::forcecast> &weights,
    int64_t size) {
  if (weights.ndim() != 1 || weights.shape(0) < 1) {
    throw std::invalid_argument("weights must be a non-empty 1-D array");
  }
  if (size < 0) {
    throw std::invalid_argument("size must be >= 0, got " + std::to_string(size));
  }
  const int64_t num_datasets = weights.shape(0);
  if (num_datasets > 32767) {
    throw std::invalid_argument("at most 32767 datasets can be blended (int16 index)");
  }
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t *ds_ptr = dataset_index.mutable_data();
  int64_t *sample_ptr = dataset_sample_index.mutable_data();
  const double *w = weights.data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> current(num_datasets, 0);
    for (int64_t sample_idx = 0; sample_idx < size; ++sample_idx) {
      const double position = sample_idx > 1 ? static_cast<double>(sample_idx) : 1.0;
      int64_t best = 0;
      double best_error = w[0] * position - static_cast<double>(current[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * position - static_cast<double>(current[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      ds_ptr[sample_idx] = static_cast<int16_t>(best);
      sample_ptr[sample_idx] = current[best];
      current[best] += 1;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "Dataset index builders (Megatron-LM compatible) for moecore.data";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        "Sample boundaries [num_samples + 1, 2] (doc_idx index, offset), int64.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "Greedy blend: (dataset_index int16 [size], dataset_sample_index int64 [size]).");
}
