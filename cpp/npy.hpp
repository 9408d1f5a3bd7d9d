// npy.hpp - read float32 and int64, write float32 C-order .npy files, nothing more.
//
// The .npy format (https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html)
// is a 6-byte magic, a 2-byte version, a little-endian header length, a Python-dict
// header such as  {'descr': '<f4', 'fortran_order': False, 'shape': (17, 3, 5), }
// padded with spaces to a multiple of 64 bytes, then the raw array data.
//
// This is all a C++ program needs to exchange tensors with Python: numpy reads the
// files with np.load and writes them with np.save, no extra package on either side.
// Anything else (another dtype, Fortran order, a truncated file) is refused with a
// message that names the file and the problem.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

template <typename T>
struct Basic {
  std::vector<int64_t> shape;  // () for a scalar
  std::vector<T> data;         // C order, shape product elements
};
using Array = Basic<float>;         // x, h0, c0
using Int64Array = Basic<int64_t>;  // lengths

namespace detail {

inline bool host_is_little_endian() {
  const uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

template <typename T>
inline void swap_bytes(std::vector<T>& values) {
  for (T& v : values) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    std::reverse(b, b + sizeof(T));
    std::memcpy(&v, b, sizeof(T));
  }
}

// The dtype a reader accepts: its .npy type code (after the byte-order mark) and names.
template <typename T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr const char* code = "f4";
  static constexpr const char* name = "float32";
};
template <>
struct Dtype<int64_t> {
  static constexpr const char* code = "i8";
  static constexpr const char* name = "int64";
};

// The text after `'key':` in the header dict, with leading spaces skipped.
inline std::string value_of(const std::string& header, const std::string& key,
                            const std::string& path) {
  const std::string quoted = "'" + key + "'";
  size_t pos = header.find(quoted);
  if (pos == std::string::npos) {
    throw std::runtime_error(path + ": malformed .npy header, no '" + key + "' key");
  }
  pos = header.find(':', pos + quoted.size());
  if (pos == std::string::npos) {
    throw std::runtime_error(path + ": malformed .npy header near '" + key + "'");
  }
  pos = header.find_first_not_of(' ', pos + 1);
  return pos == std::string::npos ? std::string() : header.substr(pos);
}

// Parse "(17, 3, 5), ..." or "(5,), ..." or "(), ..." into dimensions.
inline std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
  const std::string bad = path + ": malformed .npy header, bad 'shape'";
  if (text.empty() || text[0] != '(') throw std::runtime_error(bad);
  const size_t close = text.find(')');
  if (close == std::string::npos) throw std::runtime_error(bad);
  std::vector<int64_t> shape;
  size_t i = 1;
  while (i < close) {
    while (i < close && (text[i] == ' ' || text[i] == ',')) ++i;
    if (i == close) break;
    if (text[i] < '0' || text[i] > '9') throw std::runtime_error(bad);
    int64_t dim = 0;
    while (i < close && text[i] >= '0' && text[i] <= '9') {
      dim = dim * 10 + (text[i] - '0');
      if (dim > (int64_t{1} << 40)) throw std::runtime_error(bad);
      ++i;
    }
    shape.push_back(dim);
  }
  return shape;
}

inline int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace detail

namespace detail {

// Read a C-order .npy file of T; throws std::runtime_error naming `path` on any problem.
template <typename T>
inline Basic<T> load_as(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file (does it exist?)");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());

  const char magic[] = "\x93NUMPY";
  if (bytes.size() < 10 || std::memcmp(bytes.data(), magic, 6) != 0) {
    throw std::runtime_error(path + ": not a .npy file (bad magic bytes)");
  }
  const auto major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0;
  size_t header_start = 0;
  if (major == 1) {  // 2-byte little-endian length
    header_len = static_cast<unsigned char>(bytes[8]) |
                 (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {  // 4-byte little-endian length
    if (bytes.size() < 12) throw std::runtime_error(path + ": truncated .npy header");
    for (int k = 3; k >= 0; --k) {
      header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + k]);
    }
    header_start = 12;
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (bytes.size() < header_start + header_len) {
    throw std::runtime_error(path + ": truncated .npy header");
  }
  const std::string header(bytes.data() + header_start, header_len);

  const std::string descr = detail::value_of(header, "descr", path);
  const std::string code = Dtype<T>::code, name = Dtype<T>::name;
  bool swap = false;
  if (descr.rfind("'<" + code + "'", 0) == 0) {
    swap = !detail::host_is_little_endian();
  } else if (descr.rfind("'>" + code + "'", 0) == 0) {
    swap = detail::host_is_little_endian();
  } else {
    const std::string shown = descr.substr(0, descr.find_first_of(",}"));
    throw std::runtime_error(path + ": expected " + name + " data (descr '<" + code +
                             "'), got " + shown + "; save it with np.save(path, a.astype(np." +
                             name + "))");
  }
  if (detail::value_of(header, "fortran_order", path).rfind("False", 0) != 0) {
    throw std::runtime_error(path + ": Fortran-order arrays are not supported; "
                             "save np.ascontiguousarray(a) instead");
  }

  Basic<T> array;
  array.shape = detail::parse_shape(detail::value_of(header, "shape", path), path);
  const size_t data_start = header_start + header_len;
  const size_t available = bytes.size() - data_start;
  // Multiply up the shape without overflowing: stop as soon as it exceeds the file.
  size_t count = 1;
  for (int64_t d : array.shape) {
    count = d == 0 ? 0 : (count > available / static_cast<size_t>(d) ? available + 1 : count * d);
  }
  const size_t expected = count * sizeof(T);
  if (available != expected) {
    throw std::runtime_error(path + ": .npy data has " + std::to_string(available) +
                             " bytes, which does not match the header's shape" +
                             " (truncated or corrupt file)");
  }
  array.data.resize(count);
  if (expected > 0) std::memcpy(array.data.data(), bytes.data() + data_start, expected);
  if (swap) detail::swap_bytes(array.data);
  return array;
}

}  // namespace detail

// Read a float32 C-order .npy file; throws std::runtime_error naming `path` on any problem.
inline Array load(const std::string& path) { return detail::load_as<float>(path); }

// Read an int64 C-order .npy file (lstm_run's --lengths), with the same checks.
inline Int64Array load_int64(const std::string& path) { return detail::load_as<int64_t>(path); }

// Write `count` floats (C order, `shape`) as a version 1.0 .npy file.
inline void save(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 2);  // "(5,)" keeps its comma, "(2, 3)" not
  if (shape.size() == 1) dims.resize(dims.size() - 1);
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  // Pad so that magic(6) + version(2) + length(2) + header ends on a 64-byte boundary.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';

  std::vector<float> values(data, data + detail::numel(shape));
  if (!detail::host_is_little_endian()) detail::swap_bytes(values);

  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error(path + ": cannot open for writing");
  out.write("\x93NUMPY\x01\x00", 8);
  const char len[2] = {static_cast<char>(header.size() & 0xff),
                       static_cast<char>((header.size() >> 8) & 0xff)};
  out.write(len, 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(values.data()),
            static_cast<std::streamsize>(values.size() * sizeof(float)));
  if (!out) throw std::runtime_error(path + ": write failed");
}

}  // namespace npy
